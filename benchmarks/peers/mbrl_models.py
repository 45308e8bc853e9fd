"""mbrl-lib's side of `forethought bench models`; runs INSIDE mbrl-lib's own virtual environment.

    MBRL_PYTHON benchmarks/peers/mbrl_models.py --data DATA.npz --result OUT.json [--core N] ...

It imports only torch, mbrl and numpy (never forethought or JAX), so it runs with the python of
a separate installation of mbrl-lib (../shared/peers/mbrl-lib.md says how to make one); the
driver, benchmarks/models.py, starts it as a subprocess and reads the JSON it writes.

What it times, on the transitions in DATA.npz (`obs [N, n]`, `act [N, m]`, `next_obs [N, n]`),
pinned to one core with torch on one thread:

- `trainer`: one training epoch as mbrl-lib runs it, `ModelTrainer.train(iterator, num_epochs=1,
  evaluate=False)`: a `BootstrapIterator` (one permutation of the data per member, reshuffled
  every epoch; batches of `batch_size` per member, the last one shorter) feeding
  `OneDTransitionRewardModel.update` (delta targets, input normalisation) around a 5-member
  `GaussianMLP` (SiLU, learned log-variance bounds, Gaussian NLL), Adam with weight decay;
- `update`: the same number of `GaussianMLP.update` calls on tensors prepared beforehand (inputs
  already normalised), the least any mbrl-lib training loop can cost: the difference to
  `trainer` is mbrl-lib's per-batch data handling;
- `matmul`: a large float32 `torch.matmul` on the same core, torch's own matrix-product speed,
  and `layer_matmul`: the product of one hidden layer, `[E, B, H] @ [E, H, H]`, the shape that
  does nearly all of the training's arithmetic.

The two epoch kinds alternate, so load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="mbrl-lib GaussianMLP ensemble training-epoch timing")
    parser.add_argument("--data", required=True, help=".npz with obs, act, next_obs")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to")
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed epochs of each kind first")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=7.5e-4)
    parser.add_argument("--weight-decay", type=float, default=3e-5)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    if options.core is not None:
        os.sched_setaffinity(0, {options.core})
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.manual_seed(options.seed)

    import mbrl
    import mbrl.models
    import mbrl.types
    import mbrl.util.replay_buffer

    data = np.load(options.data)
    obs, act, next_obs = (np.asarray(data[k], np.float32) for k in ("obs", "act", "next_obs"))
    N, n = obs.shape
    m = act.shape[1]
    E, B = options.members, options.batch_size

    def build():
        net = mbrl.models.GaussianMLP(
            in_size=n + m, out_size=n, device="cpu", num_layers=options.layers, ensemble_size=E,
            hid_size=options.hidden, deterministic=False, propagation_method="fixed_model",
            learn_logvar_bounds=True, activation_fn_cfg={"_target_": "torch.nn.SiLU"})
        model = mbrl.models.OneDTransitionRewardModel(net, target_is_delta=True, normalize=True,
                                                      learned_rewards=False)
        trainer = mbrl.models.ModelTrainer(model, optim_lr=options.learning_rate,
                                           weight_decay=options.weight_decay)
        return model, trainer

    batch = mbrl.types.TransitionBatch(obs, act, next_obs, np.zeros(N, np.float32),
                                       np.zeros(N, bool), np.zeros(N, bool))

    # mbrl-lib's own path: ModelTrainer over a BootstrapIterator
    model, trainer = build()
    model.update_normalizer(batch)
    iterator = mbrl.util.replay_buffer.BootstrapIterator(
        batch, B, E, shuffle_each_epoch=True, permute_indices=True,
        rng=np.random.default_rng(options.seed))

    def trainer_epoch():
        losses, _ = trainer.train(iterator, num_epochs=1, evaluate=False, silent=True)
        return losses[-1]

    # the floor: GaussianMLP.update on prepared tensors, same batches per epoch
    raw_model, raw_trainer = build()
    raw_model.update_normalizer(batch)
    z_all = raw_model.input_normalizer.normalize(torch.from_numpy(np.concatenate([obs, act], 1))).float()
    y_all = torch.from_numpy(next_obs - obs)
    gen = torch.Generator().manual_seed(options.seed)
    batches = (N - 1) // B + 1

    def update_epoch():
        order = torch.stack([torch.randperm(N, generator=gen) for _ in range(E)])  # [E, N]
        losses = []
        for b in range(batches):
            index = order[:, b * B:(b + 1) * B]
            loss, _ = raw_model.model.update(z_all[index], raw_trainer.optimizer, target=y_all[index])
            losses.append(loss)
        return float(np.mean(losses))

    kinds = {"trainer": trainer_epoch, "update": update_epoch}
    first_loss, last_loss = {}, {}
    for name, run in kinds.items():
        for i in range(options.warmup):
            loss = run()
            if i == 0:
                first_loss[name] = loss
    times = {name: [] for name in kinds}
    cpu_times = {name: [] for name in kinds}
    for _ in range(options.epochs):
        for name, run in kinds.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            last_loss[name] = run()
            cpu_times[name].append(time.process_time() - cpu_start)
            times[name].append(time.perf_counter() - start)

    size = options.matmul_size
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)
    matmul_times, matmul_cpu = [], []
    for _ in range(options.matmul_repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        matmul_cpu.append(time.process_time() - cpu_start)
        matmul_times.append(time.perf_counter() - start)

    x = torch.randn(E, B, options.hidden)
    w = torch.randn(E, options.hidden, options.hidden)
    torch.matmul(x, w)
    layer_cpu = []
    for _ in range(50):
        cpu_start = time.process_time()
        torch.matmul(x, w)
        layer_cpu.append(time.process_time() - cpu_start)
    layer_flops = 2 * E * B * options.hidden**2

    result = {
        "library": "mbrl-lib",
        "pid": os.getpid(),
        "core": sorted(os.sched_getaffinity(0)),
        "versions": {"mbrl": getattr(mbrl, "__version__", None), "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(),
        "transitions": N,
        "minibatches_per_epoch": batches,
        "epoch_seconds": times,
        "median_epoch_seconds": {k: statistics.median(v) for k, v in times.items()},
        "epoch_cpu_seconds": cpu_times,
        "median_epoch_cpu_seconds": {k: statistics.median(v) for k, v in cpu_times.items()},
        "loss_first_epoch": first_loss,
        "loss_last_epoch": last_loss,
        "matmul": {"size": size, "seconds": matmul_times, "cpu_seconds": matmul_cpu,
                   "gflops": 2 * size**3 / statistics.median(matmul_times) / 1e9,
                   "gflops_cpu": 2 * size**3 / statistics.median(matmul_cpu) / 1e9},
        "layer_matmul": {"shape": [[E, B, options.hidden], [E, options.hidden, options.hidden]],
                         "cpu_seconds_median": statistics.median(layer_cpu),
                         "gflops_cpu": layer_flops / statistics.median(layer_cpu) / 1e9},
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    with open(options.result, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
