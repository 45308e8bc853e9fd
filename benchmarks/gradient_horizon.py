"""Gradient norm vs horizon: policy backprop (BPTT) explodes, SVG with a value tail does not.

Seed 001 "Policy Backprop" / seed 000 "Model-Based Policy Learning": backprop of the summed reward
through a long horizon of (chaotic) dynamics gives exploding/vanishing gradients; seed 003
"Solution 2" / seed 002 sec 5.4.2: a short model horizon plus a value tail (MAAC/SVG(H)) keeps the
gradient usable.

    forethought bench gradient_horizon [--horizons 5,10,20,40,70,100] [--seeds 0,1,2,3,4]

On the pendulum's true dynamics, for each seed a random tanh-MLP deterministic policy (torque
bounded by the system's limit) and 64 start states drawn from the state box; reports the median over
seeds of ||d J_H / d theta|| for `bptt_objective` (gamma = 1, no tail) and for `svg_objective`
(gamma = 0.99, tail V(s) = -cost(s, 0) / (1 - gamma), a crude stand-in value) at each horizon.
Writes gradient_horizon.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import machine_info


def main(out_dir: Path, argv: list[str]) -> int:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from forethought.agents import model_value as mv
    from forethought.systems.pendulum import Pendulum

    parser = argparse.ArgumentParser(prog="forethought bench gradient_horizon")
    parser.add_argument("--horizons", default="1,5,10,20,40,70,100")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--starts", type=int, default=64)
    args = parser.parse_args(argv)
    horizons = [int(h) for h in args.horizons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    system = Pendulum()
    limit = float(system.max_torque)
    dyn = lambda x, a, t: jax.vmap(system.dynamics, in_axes=(0, 0, None))(x, a, t)
    rew = lambda x, a: -jax.vmap(system.cost, in_axes=(0, 0, None))(x, a, 0)
    gamma = 0.99
    value = lambda x, k: rew(x, jnp.zeros((x.shape[0], 1))) / (1 - gamma)

    def pol(p, x):
        feats = jnp.stack([jnp.cos(x[:, 0]), jnp.sin(x[:, 0]), x[:, 1]], -1)
        return limit * jnp.tanh(jax.vmap(p)(feats))

    started = time.perf_counter()
    bptt, svg = {h: [] for h in horizons}, {h: [] for h in horizons}
    for seed in seeds:
        key = jax.random.PRNGKey(seed)
        net = eqx.nn.MLP(3, 1, 32, 2, activation=jnp.tanh, key=jax.random.fold_in(key, 0))
        params, static = eqx.partition(net, eqx.is_array)
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
        starts = jnp.stack([jax.random.uniform(k1, (args.starts,), minval=-np.pi, maxval=np.pi),
                            jax.random.uniform(k2, (args.starts,), minval=-2.0, maxval=2.0)], -1)
        for h in horizons:
            f_b = lambda p: mv.bptt_objective(lambda q, x: pol(eqx.combine(q, static), x), p, dyn, rew, starts, h)
            f_s = lambda p: mv.svg_objective(lambda q, x, k: (pol(eqx.combine(q, static), x), jnp.zeros(x.shape[0])),
                                             p, dyn, rew, value, starts, key, h, gamma)
            for f, store in ((f_b, bptt), (f_s, svg)):
                g = jax.jit(jax.grad(f))(params)
                store[h].append(float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))))
    result = {"horizons": horizons, "seeds": seeds, "starts": args.starts,
              "bptt_grad_norm_median": [float(np.median(bptt[h])) for h in horizons],
              "svg_value_tail_grad_norm_median": [float(np.median(svg[h])) for h in horizons],
              "bptt_grad_norm_all": {str(h): bptt[h] for h in horizons},
              "svg_grad_norm_all": {str(h): svg[h] for h in horizons},
              "seconds": round(time.perf_counter() - started, 2), "machine": machine_info(None)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gradient_horizon.json").write_text(json.dumps(result, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(horizons, result["bptt_grad_norm_median"], "o-", label="BPTT (sum of rewards, no critic)")
    ax.semilogy(horizons, result["svg_value_tail_grad_norm_median"], "s-", label="SVG(H) + value tail")
    ax.set_xlabel("horizon H (pendulum steps)")
    ax.set_ylabel("median ||dJ/dtheta||")
    ax.set_title("Policy gradient norm vs horizon, pendulum true dynamics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "gradient_horizon.png", dpi=120)
    for h, b, s in zip(horizons, result["bptt_grad_norm_median"], result["svg_value_tail_grad_norm_median"]):
        print(f"H={h:4d}  bptt {b:12.4g}  svg+tail {s:12.4g}")
    return 0
