"""A Gymnasium env with no built-in system behind it (`system_of(env)` is None), for the agents
that must then learn the task's reward and end themselves."""

import gymnasium
import numpy as np


def point_mass_env(transition, reward, horizon: int) -> gymnasium.Env:
    """A 1-D point mass `x = (position, velocity)` with force in [-1, 1], started near (2, 0)
    (standard deviation 0.2): `transition(x, u, t) -> x'` and `reward(x, u, t) -> r` (of the state
    before the step) with NumPy arrays; the episode ends (terminated) if the mass leaves [-4, 4]
    and is cut after `horizon` steps."""

    class PointMass(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.x, self.t = np.array([2.0, 0.0]) + 0.2 * self.np_random.standard_normal(2), 0
            return self.x.astype(np.float32), {}

        def step(self, action):
            x, u = self.x, float(np.clip(action, -1, 1)[0])
            r = reward(x, u, self.t)
            self.x = transition(x, u, self.t)
            self.t += 1
            return self.x.astype(np.float32), r, bool(abs(self.x[0]) > 4), self.t >= horizon, {}

    return PointMass()
