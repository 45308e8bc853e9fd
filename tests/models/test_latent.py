"""Latent space models (seed 000): shapes, the loss terms, reconstruction of a held-out frame, and
open-loop prediction of a moving-square video that beats copying the last frame."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.models import latent as L

SIZE, SIDE, SPEED = 32, 10, 4.0


def square_video(episodes, T=16, seed=0):
    """A white square on black, moved by the actions: `p' = clip(p + 4 a)`; reward = -distance
    (L1, in frames) of the square from the centre. Returns `[(obs [T+1, 32, 32, 1] uint8,
    actions [T, 2], rewards [T])]`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        p = rng.uniform(0, SIZE - SIDE, 2)
        frames, actions, rewards = [], [], []
        for t in range(T + 1):
            image = np.zeros((SIZE, SIZE, 1), np.uint8)
            y, x = np.round(p).astype(int)
            image[y:y + SIDE, x:x + SIDE] = 255
            frames.append(image)
            if t < T:
                a = rng.uniform(-1, 1, 2).astype(np.float32)
                actions.append(a)
                rewards.append(-np.abs(p - (SIZE - SIDE) / 2).sum() / SIZE)
                p = np.clip(p + SPEED * a, 0, SIZE - SIDE)
        out.append((np.stack(frames), np.stack(actions), np.asarray(rewards, np.float32)))
    return out


def small_spec(kind):
    return L.LatentSpec((SIZE, SIZE, 1), 2, kind=kind, latent=8, hidden=32, depth=4, deter=32, embed=32)


def mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


VIDEO = square_video(40)
TRAIN, HELD_OUT = VIDEO[:34], VIDEO[34:]


@pytest.fixture(scope="module", params=["deterministic", "rssm"])
def trained(request):
    kind = request.param
    store = L.EpisodeStore((SIZE, SIZE, 1), np.uint8, 2)
    for episode in TRAIN:
        store.add_episode(*episode)
    trainer = L.Trainer(L.TrainSettings(learning_rate=5e-3, batch_size=8, length=5, steps=100))
    model = L.create(small_spec(kind), jax.random.key(0))
    opt_state = trainer.init(model)
    data = store.sequences(5)
    for i in range(5 if kind == "deterministic" else 3):  # about 1.7 s per 100 updates here
        model, opt_state, report = trainer.epoch(model, opt_state, data, jax.random.key(i))
        assert int(report["skipped"]) == 0
    return kind, model


def test_shapes_of_both_models():
    obs, actions, rewards = VIDEO[0]
    det = L.create(small_spec("deterministic"), jax.random.key(1))
    x = det.normalize(obs)
    assert x.shape == (17, SIZE, SIZE, 1) and float(x.min()) >= -0.5 and float(x.max()) <= 0.5
    s = det.encode(x[0])
    assert s.shape == (8,)
    np.testing.assert_allclose([float(s.mean()), float(s.std())], [0.0, 1.0], atol=1e-3)  # normalised latent
    assert det.step(s, actions[0]).shape == (8,) and det.predict_reward(s, actions[0]).shape == ()
    assert det.decode(s).shape == (SIZE, SIZE, 1)
    rssm = L.create(small_spec("rssm"), jax.random.key(1))
    state = rssm.initial_state()
    assert state.shape == (32 + 8,) == (rssm.spec.state_size,)
    new, (prior, post) = rssm.observe(state, actions[0], rssm.encoder(x[0]), jax.random.key(2))
    assert new.shape == state.shape and prior[0].shape == post[1].shape == (8,)
    assert float(jnp.min(prior[1])) >= 0.1  # min_std
    assert rssm.imagine(new, actions[1]).shape == state.shape and rssm.decode(new).shape == (SIZE, SIZE, 1)
    pred, r = L.open_loop(det, obs[:6], actions[:5], 1)
    assert pred.shape == (5, SIZE, SIZE, 1) and pred.dtype == jnp.uint8 and r.shape == (5,)
    pred, r = L.open_loop(rssm, obs[:6], actions[:5], 3)
    assert pred.shape == (3, SIZE, SIZE, 1) and r.shape == (3,)
    vector = L.create(L.LatentSpec((5,), 2, latent=3, hidden=8, depth=2), jax.random.key(0))
    assert vector.decode(vector.encode(jnp.zeros(5))).shape == (5,)


def test_the_loss_terms_are_the_notes_likelihoods():
    obs, actions, rewards = VIDEO[0]
    model = L.create(small_spec("deterministic"), jax.random.key(3))
    x = model.normalize(obs[:6])
    a, r = jnp.asarray(actions[:5]), jnp.asarray(rewards[:5])
    weights = L.LossWeights(image_std=0.5, latent_std=0.2, reward_std=0.3, overshooting=0.0)
    total, terms = L.deterministic_loss(model, x, a, r, weights)
    s = jax.vmap(model.encode)(x)
    recon = np.mean([0.5 * np.sum((np.asarray(model.decode(s[t])) - np.asarray(x[t])) ** 2) / 0.25 for t in range(6)])
    trans = np.mean([0.5 * np.sum((np.asarray(model.step(s[t], a[t])) - np.asarray(s[t + 1])) ** 2) / 0.04
                     for t in range(5)])
    rew = np.mean([0.5 * (float(model.predict_reward(s[t], a[t])) - float(r[t])) ** 2 / 0.09 for t in range(5)])
    np.testing.assert_allclose([terms["reconstruction"], terms["transition"], terms["reward"]], [recon, trans, rew],
                               rtol=1e-4)
    np.testing.assert_allclose(total, recon + trans + rew, rtol=1e-4)
    # overshooting adds the open-loop term with its weight
    total2, terms2 = L.deterministic_loss(model, x, a, r, dataclasses.replace(weights, overshooting=2.0))
    np.testing.assert_allclose(total2, total + 2.0 * terms2["overshooting"], rtol=1e-4)
    assert float(terms2["overshooting"]) > 0
    # RSSM: the KL is >= 0 and the total charges at least free_nats per step
    rssm = L.create(small_spec("rssm"), jax.random.key(3))
    total, terms = L.rssm_loss(rssm, rssm.normalize(obs[:6]), a, r, L.LossWeights(free_nats=3.0), jax.random.key(0))
    assert float(terms["kl"]) >= 0
    np.testing.assert_allclose(total, terms["reconstruction"] + terms["reward"] + max(3.0, float(terms["kl"])),
                               rtol=1e-4)


def test_the_encoder_decoder_reconstructs_a_held_out_frame(trained):
    kind, model = trained
    mean_frame = np.mean(np.concatenate([o for o, _, _ in TRAIN]), 0)
    errors, baseline = [], []
    for obs, _, _ in HELD_OUT:
        errors.append(mse(L.reconstruct(model, obs)[1:], obs[1:]))
        baseline.append(mse(mean_frame[None], obs[1:]))
    # the mean frame (a blur) is what a model that ignores its input gives
    assert np.mean(errors) < 0.5 * np.mean(baseline), (kind, np.mean(errors), np.mean(baseline))


def test_open_loop_prediction_beats_copying_the_last_frame(trained):
    kind, model = trained
    context, steps = (1, 3) if kind == "deterministic" else (3, 3)
    errors, copies = [], []
    for obs, actions, _ in HELD_OUT:
        for start in range(0, 16 - context - steps + 1, 3):
            o, a = obs[start: start + context + steps], actions[start: start + context + steps - 1]
            pred, _ = L.open_loop(model, o, a, context)
            errors.append(mse(pred, o[context:]))
            copies.append(mse(np.broadcast_to(o[context - 1], o[context:].shape), o[context:]))
    assert np.mean(errors) < (0.85 if kind == "deterministic" else 0.6) * np.mean(copies), (kind, np.mean(errors), np.mean(copies))


def test_training_lowers_the_loss_and_the_store_round_trips(tmp_path):
    store = L.EpisodeStore((SIZE, SIZE, 1), np.uint8, 2)
    for episode in VIDEO[:3]:
        store.add_episode(*episode)
    store.save(tmp_path / "e.npz")
    back = L.EpisodeStore.load(tmp_path / "e.npz")
    assert len(back) == 3 and all(np.array_equal(a, b) for a, b in zip(back.obs, store.obs))
    back.truncate(2)
    assert len(back) == 2 and back.transitions == 32
    data = store.sequences(5)
    assert int(data.count) == 3 * (16 - 5 + 1) and data.obs.shape[0] == 64  # 51 rows padded to 64
    with pytest.raises(ForethoughtError, match="chunk length 20"):
        store.sequences(20)
    with pytest.raises(ForethoughtError, match="obs_shape"):
        L.LatentSpec((48, 48, 3), 1)
    with pytest.raises(ForethoughtError, match="add_episode"):
        store.add_episode(VIDEO[0][0][:5], VIDEO[0][1], VIDEO[0][2])
