"""mbrl-lib's side of `forethought bench pets_speed`; runs INSIDE mbrl-lib's own virtual environment.

    MBRL_PYTHON benchmarks/peers/mbrl_pets.py --result OUT.json [--core N] [--actions 10] ...

It imports only torch, mbrl and numpy (never forethought or JAX; mbrl itself brings gymnasium,
hydra and omegaconf), so it runs with the python of a separate installation of mbrl-lib
(../shared/peers/mbrl-lib.md says how to make one); the driver, benchmarks/pets_speed.py, starts
it as a subprocess and reads the JSON it writes.

What it times: seconds per action of mbrl-lib's PETS agent on its continuous cart-pole, pinned to
one core with torch on one thread, built directly in Python the way `mbrl.algorithms.pets.train`
builds it (no hydra config files):

- the environment `mbrl.env.cartpole_continuous.CartPoleEnv` (state 4, action 1 in [-1, 1]) in a
  200-step `TimeLimit`;
- `GaussianMLP` (5 members, 4 hidden layers of 200 SiLU units, mean and log-variance of the state
  change, `propagation_method="fixed_model"`: TS-infinity) inside `OneDTransitionRewardModel`
  (delta targets, input normalisation in double precision, as `algorithm/pets.yaml` sets), its
  normaliser fitted on random-action transitions of the real environment; the weights are left
  untrained (a planning step costs the same whatever the weights);
- `ModelEnv` with the true reward `mbrl.env.reward_fns.cartpole` and termination
  `mbrl.env.termination_fns.cartpole`;
- `TrajectoryOptimizerAgent` (horizon 15, replan every step, warm start) around `CEMOptimizer`
  (5 iterations, population 350, elite ratio 0.1, alpha 0.1, truncated-normal sampling, mean of
  the last elites returned), scoring each plan with `ModelEnv.evaluate_action_sequences` over 20
  particles (what `create_trajectory_optim_agent_for_model` wires up).

One timed action is one `agent.act(obs)`; the environment is then stepped with the action (not
timed), and reset (with `agent.reset()`) when an episode ends. Also timed, on the same core: a
large float32 `torch.matmul` and one hidden layer's product at planning shape
`[E, B, H] @ [E, H, H]` (B = population x particles / members rows per member).
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
    parser = argparse.ArgumentParser(description="mbrl-lib PETS seconds per action")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to")
    parser.add_argument("--actions", type=int, default=10, help="timed actions")
    parser.add_argument("--warmup", type=int, default=1, help="untimed actions first")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=15)
    parser.add_argument("--population", type=int, default=350)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--elite-ratio", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--particles", type=int, default=20)
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

    import gymnasium
    import omegaconf

    import mbrl
    import mbrl.env.cartpole_continuous
    import mbrl.env.reward_fns
    import mbrl.env.termination_fns
    import mbrl.models
    import mbrl.planning
    import mbrl.types

    env = gymnasium.wrappers.TimeLimit(mbrl.env.cartpole_continuous.CartPoleEnv(), max_episode_steps=200)
    n = env.observation_space.shape[0]
    m = env.action_space.shape[0]
    E = options.members

    net = mbrl.models.GaussianMLP(
        in_size=n + m, out_size=n, device="cpu", num_layers=options.layers, ensemble_size=E,
        hid_size=options.hidden, deterministic=False, propagation_method="fixed_model",
        learn_logvar_bounds=True, activation_fn_cfg={"_target_": "torch.nn.SiLU"})
    model = mbrl.models.OneDTransitionRewardModel(net, target_is_delta=True, normalize=True,
                                                  normalize_double_precision=True, learned_rewards=False)

    # the normaliser, fitted on random-action transitions of the real environment
    rng = np.random.default_rng(options.seed)
    env.action_space.seed(options.seed)
    obs_list, act_list, next_list = [], [], []
    obs, _ = env.reset(seed=options.seed)
    while len(obs_list) < 500:
        action = env.action_space.sample()
        next_obs, _, terminated, truncated, _ = env.step(action)
        obs_list.append(obs)
        act_list.append(action)
        next_list.append(next_obs)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
    N = len(obs_list)
    batch = mbrl.types.TransitionBatch(np.asarray(obs_list, np.float64), np.asarray(act_list, np.float64),
                                       np.asarray(next_list, np.float64), np.zeros(N), np.zeros(N, bool),
                                       np.zeros(N, bool))
    model.update_normalizer(batch)

    generator = torch.Generator(device="cpu")
    generator.manual_seed(options.seed)
    model_env = mbrl.models.ModelEnv(env, model, mbrl.env.termination_fns.cartpole,
                                     mbrl.env.reward_fns.cartpole, generator=generator)
    optimizer_cfg = omegaconf.OmegaConf.create({
        "_target_": "mbrl.planning.CEMOptimizer",
        "num_iterations": options.iterations,
        "elite_ratio": options.elite_ratio,
        "population_size": options.population,
        "alpha": options.alpha,
        "lower_bound": "???",
        "upper_bound": "???",
        "return_mean_elites": True,
        "device": "cpu",
        "clipped_normal": False,
    })
    agent = mbrl.planning.TrajectoryOptimizerAgent(
        optimizer_cfg, env.action_space.low.tolist(), env.action_space.high.tolist(),
        planning_horizon=options.horizon, replan_freq=1, verbose=False, keep_last_solution=True)
    particles = options.particles

    def trajectory_eval_fn(initial_state, action_sequences):
        return model_env.evaluate_action_sequences(action_sequences, initial_state=initial_state,
                                                   num_particles=particles)

    agent.set_trajectory_eval_fn(trajectory_eval_fn)

    obs, _ = env.reset(seed=options.seed + 1)
    agent.reset()
    wall, cpu = [], []
    episodes, actions = 1, []
    for i in range(options.warmup + options.actions):
        start, cpu_start = time.perf_counter(), time.process_time()
        action = agent.act(obs)
        cpu_time = time.process_time() - cpu_start
        wall_time = time.perf_counter() - start
        if i >= options.warmup:
            wall.append(wall_time)
            cpu.append(cpu_time)
        actions.append(float(np.asarray(action).ravel()[0]))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset(seed=options.seed + 1 + episodes)
            agent.reset()
            episodes += 1

    size = options.matmul_size
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)
    matmul_wall, matmul_cpu = [], []
    for _ in range(options.matmul_repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        matmul_cpu.append(time.process_time() - cpu_start)
        matmul_wall.append(time.perf_counter() - start)
    rows = options.population * particles // E
    x = torch.randn(E, rows, options.hidden)
    w = torch.randn(E, options.hidden, options.hidden)
    torch.matmul(x, w)
    layer_cpu = []
    for _ in range(30):
        cpu_start = time.process_time()
        torch.matmul(x, w)
        layer_cpu.append(time.process_time() - cpu_start)
    layer_flops = 2 * E * rows * options.hidden**2

    result = {
        "library": "mbrl-lib",
        "pid": os.getpid(),
        "core": sorted(os.sched_getaffinity(0)),
        "versions": {"mbrl": getattr(mbrl, "__version__", None), "torch": torch.__version__,
                     "numpy": np.__version__, "gymnasium": gymnasium.__version__,
                     "omegaconf": omegaconf.__version__, "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(),
        "model_input_dim": n + m,
        "parameters": sum(p.numel() for p in net.parameters()),
        "elite_num": int(agent.optimizer.optimizer.elite_num),
        "action_seconds": wall,
        "action_cpu_seconds": cpu,
        "median_action_seconds": statistics.median(wall),
        "median_action_cpu_seconds": statistics.median(cpu),
        "episodes_started": episodes,
        "actions": actions,
        "actions_finite": bool(np.all(np.isfinite(actions))),
        "matmul": {"size": size, "seconds": matmul_wall, "cpu_seconds": matmul_cpu,
                   "gflops": 2 * size**3 / statistics.median(matmul_wall) / 1e9,
                   "gflops_cpu": 2 * size**3 / statistics.median(matmul_cpu) / 1e9},
        "layer_matmul": {"shape": [[E, rows, options.hidden], [E, options.hidden, options.hidden]],
                         "cpu_seconds_median": statistics.median(layer_cpu),
                         "gflops_cpu": layer_flops / statistics.median(layer_cpu) / 1e9},
    }
    with open(options.result, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
