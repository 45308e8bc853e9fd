"""Models benchmark (models issue, "Benchmark"): seconds per training epoch of a probabilistic
ensemble, ours beside mbrl-lib's `GaussianMLP`, and the FLOP/s both reach on one core.

    forethought bench models [--mbrl-python PATH] [--core N] [--processes 3] [--epochs 30]

The problem, the same for both libraries: 5 members, each an MLP with 4 hidden layers of 200 SiLU
units mapping (state, action) to the mean and log-variance of the state change (learned soft
bounds on the log-variance), heteroskedastic Gaussian NLL, Adam with decoupled (ours) or L2
(mbrl-lib) weight decay 3e-5, learning rate 7.5e-4; 2000 transitions of a cart-pole-sized system
(state 4, action 1) made up by the benchmark (random states and actions, next state from a fixed
random nonlinear function plus noise, seed 0), all of them trained on (no held-out split), batch
256 per member, each member in its own random order every epoch: 8 minibatch steps per epoch.

What is timed as one epoch:
- ours: what `forethought.models.train.fit` does per epoch, minus its held-out evaluation: split
  the key, call the jitted `_epoch` (one `lax.scan` over the minibatches, all members at once,
  data padded to 2048 rows, the padding masked), wait for the result;
- mbrl-lib: `ModelTrainer.train(iterator, num_epochs=1, evaluate=False)` over a
  `BootstrapIterator` (per-member permutations) around `OneDTransitionRewardModel(GaussianMLP)`;
  also `GaussianMLP.update` on tensors prepared beforehand, the floor of any mbrl-lib loop
  (benchmarks/peers/mbrl_models.py).

How it measures. Each side runs in fresh processes pinned with `os.sched_setaffinity` to one
core: ours with XLA's CPU backend on one thread (`XLA_FLAGS` set before JAX starts, compilation
cache off), mbrl-lib with `torch.set_num_threads(1)` in its own virtual environment. The
processes alternate (ours, mbrl-lib, mbrl-lib, ours, ...) `--processes` times each; each
process runs `--warmup` untimed epochs, then `--epochs` timed ones, and reports its median.
Reported: the median over processes of those medians, of both wall-clock seconds and CPU
seconds of the process (`time.process_time`). On this shared machine other jobs take turns on
the pinned core, which stretches wall time by whatever the load is; CPU seconds count only the
time the epoch ran, so they are the one-core cost and the ratio to trust; wall time is there to
show the load. FLOP/s count the matrix products of forward and backward, about 3x the forward
(`flops_per_epoch` says how), over the 2000 real transitions for both libraries (ours also
computes on 48 padding rows per member, not counted), against a 2048 x 2048 float32 matrix
product on the same core in the same process: JAX's is the ceiling, torch's is beside it.

Ours runs twice in each of its processes, epochs alternating: with float32 matrix products
(`results.ours`) and with `TrainConfig(matmul_dtype="bfloat16")` (`results.ours_bf16`), mixed
precision: float32 master weights, optimizer state, accumulation and elementwise work, bfloat16
factors in the forward and both backward products of every layer (`ensemble.bf16_matmul`). Both
start from the same parameters and key; their first and last epochs' losses are reported side by
side, and each has its speed-up over mbrl-lib (`ratios` for float32, `ratios.bf16`).

mbrl-lib is never a dependency: give the python of a separate installation with
`--mbrl-python PATH` (default: $MBRL_PYTHON; ../shared/peers/mbrl-lib.md says how to install it,
PyPI `mbrl==0.2.0` with torch 2.13 CPU and hydra-core 1.3.2); without one, only our side runs
and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (UsageError, WorkerFailed, machine_info, median, ours_env, peer_python, pick_core,
                     run_alternating)

XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
VARIANTS = ("float32", "bfloat16")
"""`TrainConfig.matmul_dtype` values each of our processes times, epoch about."""
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "mbrl_models.py"
INSTALL_NOTE = ("mbrl-lib 0.2.0 in its own venv, never a forethought dependency: python3.11 -m venv VENV; "
                "VENV/bin/pip install torch==2.13.0 (CPU); VENV/bin/pip install mbrl==0.2.0; "
                "VENV/bin/pip install hydra-core==1.3.2 omegaconf==2.3.0 (see ../shared/peers/mbrl-lib.md); "
                "then --mbrl-python VENV/bin/python")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forethought bench models",
                                     description="ensemble training-epoch timing, ours beside mbrl-lib")
    parser.add_argument("--mbrl-python", type=Path, default=None,
                        help="python of a virtual environment with mbrl-lib installed "
                             "(default: $MBRL_PYTHON, else mbrl-lib is skipped)")
    parser.add_argument("--core", type=int, default=None,
                        help="CPU core to pin to (default: the highest one this process may use)")
    parser.add_argument("--processes", type=int, default=3, help="processes per library")
    parser.add_argument("--epochs", type=int, default=30, help="timed epochs per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed epochs per process first")
    parser.add_argument("--transitions", type=int, default=2000)
    parser.add_argument("--state-dim", type=int, default=4)
    parser.add_argument("--action-dim", type=int, default=1)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4, help="hidden layers per member")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size per member")
    parser.add_argument("--learning-rate", type=float, default=7.5e-4)
    parser.add_argument("--weight-decay", type=float, default=3e-5)
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the ceiling matmul")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


# ----- the problem -------------------------------------------------------------------------------

def make_data(transitions: int, state_dim: int, action_dim: int, seed: int) -> dict:
    """Cart-pole-sized made-up transitions: `x' = x + dt f(x, u) + noise`, `f` a fixed random
    two-layer tanh network, noise whose scale depends on the state (so the NLL has something to
    learn); returns float32 `obs [N, n]`, `act [N, m]`, `next_obs [N, n]`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(transitions, state_dim)) * np.linspace(1.0, 2.0, state_dim)
    act = rng.uniform(-1.0, 1.0, size=(transitions, action_dim))
    W1 = rng.normal(size=(state_dim + action_dim, 64)) / np.sqrt(state_dim + action_dim)
    W2 = rng.normal(size=(64, state_dim)) / 8.0
    drift = np.tanh(np.concatenate([obs, act], 1) @ W1) @ W2
    noise = 0.01 * (1.0 + np.abs(obs[:, :1])) * rng.normal(size=(transitions, state_dim))
    next_obs = obs + 0.05 * drift + noise
    return {k: v.astype(np.float32) for k, v in (("obs", obs), ("act", act), ("next_obs", next_obs))}


def flops_per_epoch(options) -> dict:
    """Matrix-product FLOPs of one epoch over `transitions` rows per member."""
    n, m, H, L = options.state_dim, options.action_dim, options.hidden, options.layers
    inputs, outputs = n + m, 2 * n
    forward_per_row = 2 * (inputs * H + (L - 1) * H * H + H * outputs)
    rows = options.members * options.transitions
    return {
        "forward_flops_per_row_per_member": forward_per_row,
        "forward_plus_backward_factor": 3,
        "flops": 3 * forward_per_row * rows,
        "how": "matrix products only: forward 2*(in*H + (L-1)*H^2 + H*2n) per row and member "
               f"(in={inputs}, H={H}, L={L}, 2n={outputs}); backward about 2x forward (input "
               "gradient and weight gradient of each layer), so forward+backward ~3x forward; "
               "times members x transitions (2000 real rows per member for both libraries; the "
               "elementwise work, Adam, and ours' 48 padding rows per member are not counted)",
    }


# ----- the driver (runs in the CLI's process) ----------------------------------------------------

def main(out_dir: Path, argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        mbrl_python = peer_python(options.mbrl_python)
        core = pick_core(options.core)
    except UsageError as error:
        print(f"forethought bench models: error: {error}", file=sys.stderr)
        return 2
    for name in ("processes", "epochs", "transitions", "members", "hidden", "layers", "batch_size"):
        if getattr(options, name) < 1:
            print(f"forethought bench models: error: --{name.replace('_', '-')} must be >= 1, "
                  f"got {getattr(options, name)}", file=sys.stderr)
            return 2

    common = ["--core", str(core)]
    for name in ("epochs", "warmup", "members", "hidden", "layers", "batch_size", "learning_rate",
                 "weight_decay", "matmul_size", "matmul_repeats", "seed"):
        common += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np

        data_path = Path(tmp) / "data.npz"
        np.savez(data_path, **make_data(options.transitions, options.state_dim, options.action_dim,
                                        options.seed))
        data = ["--data", str(data_path)]
        commands = {
            "ours": lambda round_: [sys.executable, str(Path(__file__).resolve()), "--worker", "ours", *data, *common],
            "mbrl": lambda round_: None if mbrl_python is None else [str(mbrl_python), str(PEER_SCRIPT), *data, *common],
        }
        try:
            runs = run_alternating(commands, options.processes, ours_env(XLA_FLAGS), "models", Path(tmp))
        except WorkerFailed as failure:
            print(f"forethought bench models: error: {failure}", file=sys.stderr)
            return failure.code

    record = _summarise(options, argv, runs, core, mbrl_python, load_before, started)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "models.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(record, out_dir / "models.png")
    _print_table(record)
    print(f"-> {out_dir / 'models.json'}, {out_dir / 'models.png'} ({record['wall_seconds']:.0f} s)")
    failed = [name for name, ok in record["checks"].items() if not ok]
    if failed:
        print(f"checks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0




def _summarise(options, argv, runs, core, mbrl_python, load_before, started) -> dict:
    flops = flops_per_epoch(options)
    ours_runs, mbrl_runs = runs["ours"], runs["mbrl"]

    def side(per_process_wall, per_process_cpu):
        wall, cpu = median(per_process_wall), median(per_process_cpu)
        return {"epoch_seconds_median": wall, "epoch_cpu_seconds_median": cpu,
                "per_process_epoch_seconds": per_process_wall,
                "per_process_epoch_cpu_seconds": per_process_cpu,
                "gflops_wall": flops["flops"] / wall / 1e9, "gflops_cpu": flops["flops"] / cpu / 1e9}

    results = {}
    for name, dtype in (("ours", "float32"), ("ours_bf16", "bfloat16")):
        runs_ = [r["variants"][dtype] for r in ours_runs]
        results[name] = side([r["median_epoch_seconds"] for r in runs_], [r["median_epoch_cpu_seconds"] for r in runs_])
        results[name].update({
            "matmul_dtype": dtype,
            "first_call_seconds": [r["first_call_seconds"] for r in runs_],
            "loss_first_epoch": [r["loss_first_epoch"] for r in runs_],
            "loss_last_epoch": [r["loss_last_epoch"] for r in runs_],
            "epoch_seconds": [r["epoch_seconds"] for r in runs_],
            "epoch_cpu_seconds": [r["epoch_cpu_seconds"] for r in runs_],
        })
    results["ours_bf16"]["what"] = BF16_NOTE
    # the cleanest comparison of the two: per process, where their epochs alternated
    per_process_bf16_gain = [r["variants"]["float32"]["median_epoch_cpu_seconds"]
                             / r["variants"]["bfloat16"]["median_epoch_cpu_seconds"] for r in ours_runs]
    ceiling = {
        "what": f"jnp.matmul of two {options.matmul_size}x{options.matmul_size} float32 matrices, "
                "jitted, same core and XLA flags, in each of our processes; median of "
                f"{options.matmul_repeats} products per process, median over processes",
        "gflops_wall": median([r["matmul"]["gflops"] for r in ours_runs]),
        "gflops_cpu": median([r["matmul"]["gflops_cpu"] for r in ours_runs]),
        "per_process_gflops_cpu": [r["matmul"]["gflops_cpu"] for r in ours_runs],
        "jax_layer_matmul_gflops_cpu": median([r["layer_matmul"]["gflops_cpu"] for r in ours_runs]),
        "jax_layer_matmul_bf16_gflops_cpu": median([r["layer_matmul_bf16"]["gflops_cpu"] for r in ours_runs]),
        "layer_matmul_shape": ours_runs[0]["layer_matmul"]["shape"],
        "layer_matmul_bf16_what": ours_runs[0]["layer_matmul_bf16"]["what"],
    }
    mbrl_info = {"available": False, "skipped": "no --mbrl-python and no MBRL_PYTHON: mbrl-lib was not run",
                 "install": INSTALL_NOTE}
    ratios = {}
    if mbrl_runs:
        trainer = side([r["median_epoch_seconds"]["trainer"] for r in mbrl_runs],
                       [r["median_epoch_cpu_seconds"]["trainer"] for r in mbrl_runs])
        trainer.update({
            "what": "ModelTrainer.train(iterator, num_epochs=1, evaluate=False): BootstrapIterator "
                    "(per-member permutations) -> OneDTransitionRewardModel.update -> GaussianMLP",
            "loss_first_epoch": [r["loss_first_epoch"]["trainer"] for r in mbrl_runs],
            "loss_last_epoch": [r["loss_last_epoch"]["trainer"] for r in mbrl_runs],
            "epoch_seconds": [r["epoch_seconds"]["trainer"] for r in mbrl_runs],
            "epoch_cpu_seconds": [r["epoch_cpu_seconds"]["trainer"] for r in mbrl_runs],
        })
        update = side([r["median_epoch_seconds"]["update"] for r in mbrl_runs],
                      [r["median_epoch_cpu_seconds"]["update"] for r in mbrl_runs])
        update["what"] = ("GaussianMLP.update on prepared [5, 256, in] tensors, 8 calls per epoch: the "
                          "floor of any mbrl-lib training loop")
        results["mbrl"] = trainer
        results["mbrl_update_only"] = update
        ceiling["torch_gflops_cpu"] = median([r["matmul"]["gflops_cpu"] for r in mbrl_runs])
        ceiling["torch_gflops_wall"] = median([r["matmul"]["gflops"] for r in mbrl_runs])
        ceiling["torch_layer_matmul_gflops_cpu"] = median([r["layer_matmul"]["gflops_cpu"] for r in mbrl_runs])
        ratios = {name: _ratios(results[name], trainer, update, ours_runs, mbrl_runs, dtype)
                  for name, dtype in (("ours", "float32"), ("ours_bf16", "bfloat16"))}
        # the float32 ratios stay at the top level, where earlier records have them
        ratios = {**ratios["ours"], "bf16": ratios["ours_bf16"],
                  "meaning": "mbrl-lib seconds per epoch / ours (above 1: ours is faster); target >= 2; "
                             "'bf16': the same for TrainConfig(matmul_dtype='bfloat16')",
                  "target": 2.0}
        versions = mbrl_runs[0]["versions"]
        mbrl_info = {"available": True, "python": str(mbrl_python), "versions": versions,
                     "parameters": mbrl_runs[0]["parameters"], "torch_threads": mbrl_runs[0]["torch_threads"],
                     "minibatches_per_epoch": mbrl_runs[0]["minibatches_per_epoch"],
                     "script": "benchmarks/peers/mbrl_models.py (runs inside mbrl-lib's venv)",
                     "install": INSTALL_NOTE}
    for name in ("ours", "ours_bf16", "mbrl"):
        if name in results:
            results[name]["fraction_of_ceiling_cpu"] = results[name]["gflops_cpu"] / ceiling["gflops_cpu"]
    # the least an epoch can cost with XLA's matrix-product kernels at these shapes
    results["ours"]["matmul_floor_seconds"] = flops["flops"] / (ceiling["jax_layer_matmul_gflops_cpu"] * 1e9)
    results["ours_bf16"]["matmul_floor_seconds"] = flops["flops"] / (ceiling["jax_layer_matmul_bf16_gflops_cpu"] * 1e9)
    results["ours_bf16"]["speedup_cpu_over_float32_per_process"] = per_process_bf16_gain
    results["ours_bf16"]["speedup_cpu_over_float32"] = median(per_process_bf16_gain)
    if ratios:
        ratios["speedup_cpu_bound_at_jax_matmul_rate"] = (results["mbrl"]["epoch_cpu_seconds_median"]
                                                         / results["ours"]["matmul_floor_seconds"])
        ratios["bf16"]["speedup_cpu_bound_at_jax_matmul_rate"] = (results["mbrl"]["epoch_cpu_seconds_median"]
                                                                 / results["ours_bf16"]["matmul_floor_seconds"])

    checks = {"ours_loss_decreases": all(r["loss_last_epoch"] < r["loss_first_epoch"] for r in ours_runs),
              "ours_bf16_loss_decreases": all(v["loss_last_epoch"] < v["loss_first_epoch"]
                                              for v in (r["variants"]["bfloat16"] for r in ours_runs)),
              "ours_pinned_one_core": all(r["machine"]["affinity"] == [core] for r in ours_runs)}
    if mbrl_runs:
        checks["mbrl_loss_decreases"] = all(r["loss_last_epoch"]["trainer"] < r["loss_first_epoch"]["trainer"]
                                            for r in mbrl_runs)
        checks["mbrl_pinned_one_core"] = all(r["core"] == [core] for r in mbrl_runs)
        checks["mbrl_torch_one_thread"] = all(r["torch_threads"] == 1 for r in mbrl_runs)
    return {
        "benchmark": "models",
        "command": " ".join(["forethought", "bench", "models", *argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**ours_runs[0]["machine"], "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {
            "members": options.members, "hidden": options.hidden, "hidden_layers": options.layers,
            "activation": "silu", "loss": "heteroskedastic Gaussian NLL, learned soft log-variance bounds "
                                          "(bound penalty weight 0.01)",
            "optimizer": f"Adam, lr {options.learning_rate}, weight decay {options.weight_decay} "
                         "(ours: optax.adamw, decoupled; mbrl-lib: torch.optim.Adam, L2)",
            "transitions": options.transitions, "state_dim": options.state_dim,
            "action_dim": options.action_dim, "batch_size_per_member": options.batch_size,
            "minibatches_per_epoch": -(-options.transitions // options.batch_size),
            "holdout": "none: both train on all transitions; evaluation passes are not timed",
            "data": "make_data(): random states and actions, x' = x + 0.05 f(x, u) + state-dependent "
                    f"noise, f a fixed random tanh network, seed {options.seed}; the same .npz for both",
            "processes_per_library": options.processes, "timed_epochs_per_process": options.epochs,
            "warmup_epochs_per_process": options.warmup, "core": core,
            "ours_variants": "TrainConfig.matmul_dtype 'float32' (results.ours) and 'bfloat16' (results.ours_bf16, "
                             "mixed precision), timed in the same processes, epochs alternating",
            "ours_parameters": ours_runs[0]["parameters"],
        },
        "flops_per_epoch": flops,
        "ceiling": ceiling,
        "mbrl": mbrl_info,
        "results": results,
        "ratios": ratios,
        "notes": NOTES,
        "checks": checks,
    }


BF16_NOTE = ("the same epoch with TrainConfig(matmul_dtype='bfloat16'): mixed precision. Parameters "
             "(the float32 master weights), Adam's state, every accumulation, the loss and all elementwise "
             "work stay float32; only the two factors of each matrix product are rounded to bfloat16, "
             "in the forward pass and in both backward products (input and weight gradients), by "
             "forethought.models.ensemble.bf16_matmul's hand-written backward pass")


def _ratios(ours: dict, trainer: dict, update: dict, ours_runs, mbrl_runs, dtype: str) -> dict:
    """mbrl-lib's epoch over one of ours: ratios of medians, and the same ratio per round
    (processes that ran next to each other)."""
    return {
        "speedup_cpu": trainer["epoch_cpu_seconds_median"] / ours["epoch_cpu_seconds_median"],
        "speedup_wall": trainer["epoch_seconds_median"] / ours["epoch_seconds_median"],
        "speedup_cpu_per_round": [m["median_epoch_cpu_seconds"]["trainer"]
                                  / o["variants"][dtype]["median_epoch_cpu_seconds"]
                                  for o, m in zip(ours_runs, mbrl_runs)],
        "speedup_wall_per_round": [m["median_epoch_seconds"]["trainer"] / o["variants"][dtype]["median_epoch_seconds"]
                                   for o, m in zip(ours_runs, mbrl_runs)],
        "speedup_cpu_over_update_only": update["epoch_cpu_seconds_median"] / ours["epoch_cpu_seconds_median"],
    }


NOTES = [
    "Headline: CPU seconds per epoch (time.process_time of the pinned single-threaded process). "
    "The machine is shared (load average in 'machine'); other jobs take turns on the pinned core, "
    "which adds their time to wall-clock seconds but not to CPU seconds. Wall seconds are reported "
    "beside them; their ratio is noisier.",
    "Each per-process value is the median of that process's timed epochs; the reported value is the "
    "median over processes. Ours and mbrl-lib processes alternate, so the per-round ratios compare "
    "processes that ran next to each other.",
    "Ours pads 2000 rows to 2048 (fit() pads to a power of two so a growing buffer recompiles rarely); "
    "the 48 padding rows per member are computed and masked: both sides run 8 minibatch steps per "
    "epoch. FLOP/s count the 2000 real rows for both.",
    "mbrl-lib's update() also computes the gradient norm (one .item() per parameter) for its "
    "metadata; that is part of its training pass and is timed.",
    "results.ours.matmul_floor_seconds: the epoch's matrix-product FLOPs at the rate XLA reaches on "
    "one hidden layer's product [5, 256, 200] @ [5, 200, 200] in the same process: what an epoch would "
    "cost with no elementwise work, no optimizer and no overhead; ratios.speedup_cpu_bound_at_jax_"
    "matmul_rate is mbrl-lib's epoch over it, the most any JAX-side change can reach without faster "
    "matrix-product kernels.",
    "Small differences in the models, not in the work timed: mbrl-lib's learned log-variance bounds "
    "are shared by the members ([1, n]), ours are per member ([E, n]): 617,048 vs 617,080 parameters; "
    "mbrl-lib normalises inputs only, ours inputs and targets (so the two losses are on different "
    "scales; both must decrease, see checks).",
    "Compile time is not part of an epoch: ours' first call (trace + compile + one epoch) is in "
    "results.ours.first_call_seconds; the compilation cache is off in our workers.",
    "results.ours_bf16: " + BF16_NOTE + ". Each of our processes times both variants, their epochs "
    "alternating (float32 first on even epochs, bfloat16 first on odd ones), each training its own copy "
    "from the same initial parameters with the same key (so the same minibatches): loss_first_epoch and "
    "loss_last_epoch of results.ours and results.ours_bf16 compare the numerics. Its FLOP/s count the "
    "same FLOPs; ceiling.jax_layer_matmul_bf16_gflops_cpu is XLA's rate for one hidden layer's product on "
    "bfloat16 factors, and results.ours_bf16.matmul_floor_seconds the epoch at that rate. "
    "results.ours_bf16.speedup_cpu_over_float32 is the median over processes of float32's median epoch "
    "over bfloat16's in the same process.",
]


# ----- our worker (a fresh process, pinned, XLA_FLAGS in the environment) -------------------------

def _worker(options) -> int:
    os.sched_setaffinity(0, {options.core})
    assert "jax" not in sys.modules, "the worker must set up before JAX is imported"
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from forethought.models.ensemble import Ensemble, EnsembleSpec
    from forethought.models.normalize import Normalizer
    from forethought.models.train import TrainConfig, _bucket, _epoch, _optimizer, _pad

    data = np.load(options.data)
    obs, act, next_obs = (np.asarray(data[k], np.float32) for k in ("obs", "act", "next_obs"))
    N, n = obs.shape
    spec = EnsembleSpec(state_dim=n, action_dim=act.shape[1], members=options.members,
                        hidden=options.hidden, layers=options.layers, activation="silu")
    config = TrainConfig(learning_rate=options.learning_rate, weight_decay=options.weight_decay,
                         batch_size=options.batch_size, holdout=0.0)
    key = jax.random.key(options.seed)
    key, init_key = jax.random.split(key)
    model = Ensemble.create(spec, init_key)

    # what fit() does before its epochs (no held-out split here: all N rows train)
    features = np.concatenate([obs, act], axis=1)  # no angle dimensions
    targets = next_obs - obs
    model = eqx.tree_at(lambda m: (m.input_norm, m.target_norm), model,
                        (Normalizer.fit(jnp.asarray(features)), Normalizer.fit(jnp.asarray(targets))))
    C = _bucket(N)
    z = jnp.asarray(_pad(np.asarray(model.input_norm(jnp.asarray(features))), C))
    y = jnp.asarray(_pad(np.asarray(model.target_norm(jnp.asarray(targets))), C))
    optimizer = _optimizer(config.learning_rate, config.weight_decay)
    params, _ = eqx.partition(model.net, eqx.is_array)
    opt_state = optimizer.init(params)
    n_valid = jnp.int32(N)

    def epoch(state, matmul_dtype):
        # the body of fit()'s epoch loop, less the held-out evaluation
        params, opt_state, key = state
        key, epoch_key = jax.random.split(key)
        params, opt_state, loss = _epoch(model, params, opt_state, z, y, n_valid, epoch_key, optimizer,
                                         config.batch_size, config.logvar_bound_weight, config.bootstrap,
                                         matmul_dtype)
        jax.block_until_ready((params, opt_state, loss))
        return (params, opt_state, key), float(loss)

    # each variant trains its own copy from the same parameters and key (so the same shuffles)
    state = {dtype: (params, opt_state, key) for dtype in VARIANTS}
    timing = {dtype: {"epoch_seconds": [], "epoch_cpu_seconds": []} for dtype in VARIANTS}
    for dtype in VARIANTS:
        start = time.perf_counter()
        state[dtype], timing[dtype]["loss_first_epoch"] = epoch(state[dtype], dtype)
        timing[dtype]["first_call_seconds"] = time.perf_counter() - start
        for _ in range(options.warmup - 1):
            state[dtype], _ = epoch(state[dtype], dtype)
    for i in range(options.epochs):  # alternating epochs, in turn first
        for dtype in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            start, cpu_start = time.perf_counter(), time.process_time()
            state[dtype], timing[dtype]["loss_last_epoch"] = epoch(state[dtype], dtype)
            timing[dtype]["epoch_cpu_seconds"].append(time.process_time() - cpu_start)
            timing[dtype]["epoch_seconds"].append(time.perf_counter() - start)
    for entry in timing.values():
        entry["median_epoch_seconds"] = statistics.median(entry["epoch_seconds"])
        entry["median_epoch_cpu_seconds"] = statistics.median(entry["epoch_cpu_seconds"])

    # the ceiling: a large float32 matrix product on this core, and one hidden layer's product
    size = options.matmul_size
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    matmul_wall, matmul_cpu = [], []
    for _ in range(options.matmul_repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        product(a, b).block_until_ready()
        matmul_cpu.append(time.process_time() - cpu_start)
        matmul_wall.append(time.perf_counter() - start)
    E, B, H = options.members, options.batch_size, options.hidden
    x = jax.random.normal(jax.random.key(3), (E, B, H), jnp.float32)
    w = jax.random.normal(jax.random.key(4), (E, H, H), jnp.float32)

    def layer_rate(x, w, **kwargs) -> float:
        layer = jax.jit(lambda x, w: jnp.einsum("ebi,eio->ebo", x, w, **kwargs))
        layer(x, w).block_until_ready()
        layer_cpu = []
        for _ in range(50):
            cpu_start = time.process_time()
            layer(x, w).block_until_ready()
            layer_cpu.append(time.process_time() - cpu_start)
        return statistics.median(layer_cpu)

    layer_cpu = layer_rate(x, w)
    layer_bf16_cpu = layer_rate(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    result = {
        "library": "forethought",
        **timing["float32"],  # the float32 epoch, as before the bfloat16 variant existed
        "variants": timing,
        "padded_rows": C, "minibatches_per_epoch": C // min(config.batch_size, C),
        "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
        "matmul": {"size": size, "seconds": matmul_wall, "cpu_seconds": matmul_cpu,
                   "gflops": 2 * size**3 / statistics.median(matmul_wall) / 1e9,
                   "gflops_cpu": 2 * size**3 / statistics.median(matmul_cpu) / 1e9},
        "layer_matmul": {"shape": [[E, B, H], [E, H, H]], "cpu_seconds_median": layer_cpu,
                         "gflops_cpu": 2 * E * B * H * H / layer_cpu / 1e9},
        "layer_matmul_bf16": {"shape": [[E, B, H], [E, H, H]], "cpu_seconds_median": layer_bf16_cpu,
                              "gflops_cpu": 2 * E * B * H * H / layer_bf16_cpu / 1e9,
                              "what": "the same product on bfloat16 factors (cast beforehand, not timed) "
                                      "with float32 results"},
        "machine": machine_info(options.core),
    }
    options.result.write_text(json.dumps(result, indent=2))
    return 0



# ----- output ------------------------------------------------------------------------------------

def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, ceiling = record["results"], record["ceiling"]
    sides = [("ours", "forethought (JAX), float32", "#1f77b4"),
             ("ours_bf16", "forethought, bfloat16 products (mixed precision)", "#17becf"),
             ("mbrl", "mbrl-lib ModelTrainer", "#d62728"),
             ("mbrl_update_only", "mbrl-lib GaussianMLP.update only", "#f4a3a3")]
    sides = [s for s in sides if s[0] in results]
    fig, axes = plt.subplots(1, 2, figsize=(17, 7), gridspec_kw={"width_ratios": [3, 2]})

    ax = axes[0]
    width = 0.8 / len(sides)
    groups = [("epoch_cpu_seconds_median", "per_process_epoch_cpu_seconds", "gflops_cpu", "CPU seconds\n(one-core cost)"),
              ("epoch_seconds_median", "per_process_epoch_seconds", "gflops_wall",
               "wall-clock seconds\n(other jobs share the core: load-dependent)")]
    for g, (field, per_process, gflops, _) in enumerate(groups):
        for i, (name, label, color) in enumerate(sides):
            x = g + (i - (len(sides) - 1) / 2) * width
            value = results[name][field] * 1e3
            ax.bar(x, value, width * 0.95, color=color, label=label if g == 0 else None)
            ax.scatter([x] * len(results[name][per_process]), [v * 1e3 for v in results[name][per_process]],
                       color="black", s=10, zorder=3, label="per process" if g == 0 and i == 0 else None)
            top = max([value] + [v * 1e3 for v in results[name][per_process]])
            ax.annotate(f"{value:.0f} ms\n{results[name][gflops]:.0f} GFLOP/s", (x, top), ha="center",
                        va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(groups)), [g[3] for g in groups])
    ax.set_ylabel("ms per training epoch (median of process medians)")
    ratios = record.get("ratios") or {}
    title = "One training epoch: 5-member ensemble, 4x200 SiLU, Gaussian NLL, Adam\n2000 transitions, batch 256 per member, one core"
    if ratios:
        for label, r in (("ours float32", ratios), ("ours bfloat16", ratios.get("bf16"))):
            if r:
                per_round = ", ".join(f"{v:.2f}" for v in r["speedup_cpu_per_round"])
                title += (f"\nmbrl-lib / {label}: {r['speedup_cpu']:.2f}x CPU seconds (per round {per_round}; "
                          f"target 2x), wall {r['speedup_wall']:.2f}x")
    else:
        title += "\n(mbrl-lib not run: no --mbrl-python)"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)
    ax.legend(loc="upper center", fontsize=8, ncol=3)
    if "ours_bf16" in results:
        ax.text(0.01, 0.80, "loss, first -> last timed epoch (same start and minibatches):\n"
                f"float32 {_losses(results['ours'])}\nbfloat16 {_losses(results['ours_bf16'])}",
                transform=ax.transAxes, ha="left", va="top", fontsize=7)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    bars = [("forethought\nf32 epoch", results["ours"]["gflops_cpu"], "#1f77b4")]
    if "ours_bf16" in results:
        bars.append(("forethought\nbf16 epoch", results["ours_bf16"]["gflops_cpu"], "#17becf"))
    if "mbrl" in results:
        bars.append(("mbrl-lib\nepoch", results["mbrl"]["gflops_cpu"], "#d62728"))
    bars.append(("JAX layer\nmatmul", ceiling["jax_layer_matmul_gflops_cpu"], "#9ecae1"))
    if "jax_layer_matmul_bf16_gflops_cpu" in ceiling:
        bars.append(("JAX bf16\nlayer matmul", ceiling["jax_layer_matmul_bf16_gflops_cpu"], "#9edae5"))
    if "torch_layer_matmul_gflops_cpu" in ceiling:
        bars.append(("torch layer\nmatmul", ceiling["torch_layer_matmul_gflops_cpu"], "#fcbba1"))
    bars.append((f"JAX {ceiling_size(record)}²\nmatmul", ceiling["gflops_cpu"], "#6baed6"))
    if "torch_gflops_cpu" in ceiling:
        bars.append((f"torch {ceiling_size(record)}²\nmatmul", ceiling["torch_gflops_cpu"], "#fb6a4a"))
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], 0.7, color=[b[2] for b in bars])
    for x, (_, value, _) in zip(xs, bars):
        ax.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                    textcoords="offset points")
    ax.axhline(ceiling["gflops_cpu"], color="gray", ls="--", lw=1, label="JAX large float32 matmul")
    ax.legend(loc="upper right", fontsize=8, bbox_to_anchor=(1, 0.93))
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("GFLOP/s per CPU second (float32 unless marked bf16)")
    ax.set_title("Achieved matrix-product FLOP/s (fwd+bwd = 3x fwd)\nvs the one-core ceiling, same run",
                 fontsize=10)
    ax.set_ylim(0, max(b[1] for b in bars) * 1.2)
    floors = [(label, results[name].get("matmul_floor_seconds")) for name, label in
              (("ours", "float32"), ("ours_bf16", "bf16")) if name in results]
    text = "; ".join(f"{label} {floor * 1e3:.0f} ms" for label, floor in floors if floor)
    if text:
        ax.text(0.02, 0.97, f"ours' epoch at the JAX layer-matmul rate, nothing else: {text}",
                transform=ax.transAxes, fontsize=8, va="top")
    ax.grid(axis="y", alpha=0.3)
    m = record["machine"]
    fig.text(0.01, 0.01, f"{m['cpu']}, core {m['pinned_core']}, load avg {m['loadavg_before'][0]:.1f}; "
             f"jax {m['jax']}" + (f", torch {record['mbrl']['versions']['torch']}, mbrl {record['mbrl']['versions']['mbrl']}"
                                  if record["mbrl"]["available"] else ""), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _losses(side: dict) -> str:
    return ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(side["loss_first_epoch"], side["loss_last_epoch"]))


def ceiling_size(record: dict) -> int:
    return int(record["ceiling"]["what"].split("two ", 1)[1].split("x", 1)[0])


def _print_table(record: dict) -> None:
    results, ceiling = record["results"], record["ceiling"]
    rows = [("side", "ms/epoch CPU", "ms/epoch wall", "GFLOP/s CPU", "GFLOP/s wall", "per-process CPU ms")]
    for name in ("ours", "ours_bf16", "mbrl", "mbrl_update_only"):
        if name in results:
            r = results[name]
            rows.append((name, f"{r['epoch_cpu_seconds_median'] * 1e3:.1f}", f"{r['epoch_seconds_median'] * 1e3:.1f}",
                         f"{r['gflops_cpu']:.1f}", f"{r['gflops_wall']:.1f}",
                         " ".join(f"{v * 1e3:.1f}" for v in r["per_process_epoch_cpu_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"ceiling: JAX {ceiling['gflops_cpu']:.1f} GFLOP/s (CPU time), {ceiling['gflops_wall']:.1f} (wall); "
          f"JAX layer-shape matmul {ceiling['jax_layer_matmul_gflops_cpu']:.1f}"
          + (f"; torch {ceiling['torch_gflops_cpu']:.1f}, torch layer-shape {ceiling['torch_layer_matmul_gflops_cpu']:.1f}"
             if "torch_gflops_cpu" in ceiling else ""))
    print(f"JAX bf16 layer-shape matmul {ceiling['jax_layer_matmul_bf16_gflops_cpu']:.1f} GFLOP/s (CPU time)")
    print(f"ours at the JAX layer-matmul rate with no other work: "
          f"{results['ours']['matmul_floor_seconds'] * 1e3:.1f} ms/epoch float32, "
          f"{results['ours_bf16']['matmul_floor_seconds'] * 1e3:.1f} bf16")
    bf16 = results["ours_bf16"]
    print(f"ours bf16 / float32 in the same processes: {bf16['speedup_cpu_over_float32']:.2f}x CPU; loss first -> last "
          f"epoch: float32 {_losses(results['ours'])}, bf16 {_losses(bf16)}")
    ratios = record.get("ratios")
    if ratios:
        for label, r in (("ours float32", ratios), ("ours bf16", ratios["bf16"])):
            print(f"mbrl-lib / {label}: {r['speedup_cpu']:.2f}x CPU, {r['speedup_wall']:.2f}x wall "
                  f"(per round CPU: {', '.join(f'{v:.2f}' for v in r['speedup_cpu_per_round'])}); target 2x")
    else:
        print(record["mbrl"]["skipped"])


if __name__ == "__main__":
    _options = _parser().parse_args()
    if _options.worker is None:
        sys.exit(main(Path(__file__).resolve().parent / "results", sys.argv[1:]))
    sys.exit(_worker(_options))
