"""User-level DP-SGD for a silo (common.silo_dp): one user is one DP-SGD sample (the unit whose
influence the clip bounds), the released update, accountant history across rounds, ε against our
ledger, and a silo that learns under DP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ModelConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.device import client_evaluate
from common.evaluation import EvalSets
from common.models import ClientData, ItemParams, UserData
from common.models.mf.params import init_items
from common.models.mf.train import local_item_update
from common.models.reconstruction import fit_user
from common.privacy import Sampling
from common.silo_dp import (
    GRAD_SAMPLE_MODES,
    RELEASED_PARAMETERS,
    ItemScorer,
    SiloDPResult,
    dp_sgd_item_update,
    ledger_from_history,
    silo_ledger,
    user_samples,
)
from tests.conftest import write_block_csv

torch.set_num_threads(1)

REG = 1.0  # user reconstruction λ for these small silos
DIM = 8
N_SILO_USERS = 30

# σ ≈ 0 is only there to compare directions; Opacus rightly warns that its ε is off the scale.
huge_epsilon_ok = pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> EvalSets:
    """30 users in 4 taste groups (the ``block_csv`` generator with 30 users)."""
    csv = write_block_csv(tmp_path_factory.mktemp("silo") / "ratings.csv", n_users=N_SILO_USERS)
    return EvalSets.from_split(split_interactions(load_interactions(str(csv)), "random", seed=0))


@pytest.fixture(scope="module")
def silo(sets) -> ClientData:
    """All 30 users in one silo."""
    return ClientData.from_sets(0, np.arange(N_SILO_USERS), sets)


@pytest.fixture(scope="module")
def start(sets) -> ItemParams:
    return init_items(sets.n_items, DIM, seed=0)


def run(params: ItemParams, users: list[UserData], **overrides) -> SiloDPResult:
    kwargs = dict(user_reg=REG, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, epochs=1,
                  lr=0.5, seed=0, history=[])
    return dp_sgd_item_update(params, users, **{**kwargs, **overrides})


def flat(p: ItemParams) -> np.ndarray:
    return np.r_[p.embeddings.ravel(), p.bias].astype(np.float64)


def cosine(a: ItemParams, b: ItemParams) -> float:
    x, y = flat(a), flat(b)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def per_example_grads(scorer: ItemScorer, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one backward per user (sample), (B, I, d) and (B, I)."""
    weights, biases = [], []
    for i in range(len(y)):
        scorer.zero_grad()
        torch.nn.functional.cross_entropy(scorer(x[i:i + 1]), y[i:i + 1]).backward()
        weights.append(scorer.linear.weight.grad.numpy().copy())
        biases.append(scorer.linear.bias.grad.numpy().copy())
    return np.stack(weights), np.stack(biases)


def user_gradients(params: ItemParams, users: list[UserData]) -> list[np.ndarray]:
    """Each user's own gradient of their softmax loss (common.models.reconstruction.item_loss) at their vector."""
    from common.models.reconstruction import item_loss

    out = []
    for user in users:
        V = torch.from_numpy(params.embeddings.copy()).requires_grad_(True)
        b = torch.from_numpy(params.bias.copy()).requires_grad_(True)
        u = torch.from_numpy(fit_user(params, user, loss="softmax", reg=REG))
        item_loss(V, b, u, user, loss="softmax").backward()
        out.append(np.r_[V.grad.numpy().ravel(), b.grad.numpy()])
    return out


# ---------------------------------------------------------------- (1) per-sample gradients

def test_item_scorer_round_trips_item_params(start):
    scorer = ItemScorer.from_params(start)
    u = torch.randn(3, DIM)
    np.testing.assert_allclose(scorer(u).detach().numpy(), u.numpy() @ start.embeddings.T + start.bias, rtol=1e-5,
                               atol=1e-6)
    back = scorer.to_params()
    np.testing.assert_array_equal(back.embeddings, start.embeddings)
    np.testing.assert_array_equal(back.bias, start.bias)
    back.embeddings[0, 0] += 1  # copies, not views
    assert scorer.linear.weight[0, 0].item() == start.embeddings[0, 0]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs need no gradient
def test_opacus_per_sample_gradients_are_each_users_own_gradient(silo, start):
    from opacus import GradSampleModule

    users = list(silo.trainable)[:9]
    x, y = user_samples(start, users, user_reg=REG)
    module = GradSampleModule(ItemScorer.from_params(start), loss_reduction="sum")
    torch.nn.functional.cross_entropy(module(x), y, reduction="sum").backward()
    weight, bias = module._module.linear.weight, module._module.linear.bias
    got = np.concatenate([weight.grad_sample.numpy().reshape(len(users), -1), bias.grad_sample.numpy()], axis=1)
    np.testing.assert_allclose(got, np.stack(user_gradients(start, users)), rtol=1e-4, atol=1e-5)


def test_one_users_data_moves_only_that_users_sample(silo, start):
    """Issue #11 (4): the clip bounds one unit's influence only if a unit's data enters no other
    sample. With one sample per rating, removing one of a user's ratings moved the inputs (the user
    vector) of that user's other records; with one sample per user, changing or removing a user
    leaves every other sample exactly as it was."""
    users = list(silo.trainable)[:6]
    x, y = user_samples(start, users, user_reg=REG)
    changed = users[:2] + [UserData(users[2].items[1:], users[2].ratings[1:])] + users[3:]
    x2, y2 = user_samples(start, changed, user_reg=REG)
    others = [i for i in range(len(users)) if i != 2]
    np.testing.assert_array_equal(x2[others].numpy(), x[others].numpy())
    np.testing.assert_array_equal(y2[others].numpy(), y[others].numpy())
    assert not np.array_equal(x2[2].numpy(), x[2].numpy())  # the changed user's own sample did move
    removed_x, _ = user_samples(start, users[:2] + users[3:], user_reg=REG)
    np.testing.assert_array_equal(removed_x.numpy(), x[others].numpy())


@huge_epsilon_ok
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_one_full_batch_step_is_the_clipped_mean_gradient(silo, start, mode):
    """q = 1, σ ≈ 0: one step, ``−lr/n · Σ clip_C(g_u)``, with a C small enough to clip."""
    users, lr, clip = list(silo.trainable), 0.1, 0.05
    x, y = user_samples(start, users, user_reg=REG)
    w, b = per_example_grads(ItemScorer.from_params(start), x, y)
    norms = np.sqrt((w ** 2).sum((1, 2)) + (b ** 2).sum(1))
    assert (norms > clip).all()  # every user is clipped
    factor = np.minimum(1.0, clip / norms)
    result = run(start, users, sample_rate=1.0, noise_multiplier=1e-9, max_grad_norm=clip, lr=lr,
                 grad_sample_mode=mode)
    assert result.steps == 1 and result.users == len(y) == len(users)
    np.testing.assert_allclose(result.update.embeddings, -lr / len(y) * np.einsum("n,nid->id", factor, w),
                               rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(result.update.bias, -lr / len(y) * np.einsum("n,ni->i", factor, b),
                               rtol=1e-3, atol=1e-7)


def test_ghost_clipping_and_per_sample_hooks_give_the_same_noisy_update(silo, start):
    """Same seed: same Poisson batches and noise draws; only the clipping arithmetic differs."""
    users = list(silo.trainable)
    ghost = run(start, users, epochs=2, grad_sample_mode="ghost")
    hooks = run(start, users, epochs=2, grad_sample_mode="hooks")
    np.testing.assert_allclose(flat(ghost.update), flat(hooks.update), rtol=1e-4, atol=1e-6)
    assert ghost.history == hooks.history and ghost.mean_loss == pytest.approx(hooks.mean_loss, rel=1e-5)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_poisson_batches_still_add_noise_and_are_charged(start, mode):
    """Four users, batch 1: q = 1/4, so a step's batch is empty 32% of the time."""
    users = [UserData(np.array([3 + k, 7, 11 + k, 20], dtype=np.int64), np.ones(4, np.float32)) for k in range(4)]
    for seed in range(2):
        result = run(start, users, sample_rate=0.25, epochs=2, seed=seed, grad_sample_mode=mode)
        assert result.steps == 8 and result.history == [(1.0, 0.25, 8)]
        assert np.isfinite(flat(result.update)).all()
        # noise reaches every coordinate, including items nobody rated
        assert np.count_nonzero(result.update.embeddings) == result.update.embeddings.size


# ---------------------------------------------------------------- (2) what is released

def test_update_has_the_received_shapes_and_leaves_the_inputs_alone(silo, start):
    users = list(silo.trainable)
    before = start.copy()
    result = run(start, users)
    assert result.update.embeddings.shape == start.embeddings.shape
    assert result.update.bias.shape == start.bias.shape
    assert result.update.embeddings.dtype == np.float32 and result.update.bias.dtype == np.float32
    assert np.isfinite(flat(result.update)).all() and np.abs(flat(result.update)).max() > 0
    np.testing.assert_array_equal(start.embeddings, before.embeddings)  # received params not mutated
    np.testing.assert_array_equal(start.bias, before.bias)
    # the only trainable parameters are the item table and biases: user vectors are inputs
    names = {n for n, p in ItemScorer.from_params(start).named_parameters() if p.requires_grad}
    assert names == {"linear.weight", "linear.bias"}
    assert result.event.parameters == RELEASED_PARAMETERS
    assert result.event.sampling is Sampling.POISSON
    assert result.users == len(users)
    assert not result.secure_mode


def test_user_samples_hold_one_reconstructed_vector_and_item_counts_per_user(silo, start):
    users = list(silo.trainable)[:3] + [UserData(np.zeros(0, np.int64), np.zeros(0, np.float32))]
    x, y = user_samples(start, users, user_reg=REG)
    assert x.shape == (3, DIM) and y.shape == (3, start.n_items)
    for k in range(3):
        np.testing.assert_array_equal(np.flatnonzero(y[k].numpy()), np.sort(users[k].items))
        assert float(y[k].sum()) == len(users[k].items)
    np.testing.assert_array_equal(x[0].numpy(), fit_user(start, users[0], loss="softmax", reg=REG))
    with pytest.raises(ValueError, match="no ratings"):
        user_samples(start, users[-1:], user_reg=REG)


def test_same_seed_same_update_and_bad_arguments_refused(silo, start):
    users = list(silo.trainable)
    a, b = run(start, users, seed=3), run(start, users, seed=3)
    np.testing.assert_array_equal(a.update.embeddings, b.update.embeddings)
    assert not np.array_equal(a.update.embeddings, run(start, users, seed=4).update.embeddings)
    with pytest.raises(ValueError, match="sample_rate"):
        run(start, users, sample_rate=0.0)
    with pytest.raises(ValueError, match="history"):
        run(start, users, history=[(1.0, 0.1)])
    with pytest.raises(ValueError, match="grad_sample_mode"):
        run(start, users, grad_sample_mode="functorch")


def test_secure_mode_fails_loudly_without_a_csprng(silo, start):
    """Opacus' secure mode needs torchcsprng; without it there is no silent fallback."""
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchcsprng"):
            run(start, list(silo.trainable), noise_source="torchcsprng")
    else:  # pragma: no cover - not installed here
        assert run(start, list(silo.trainable), noise_source="torchcsprng").secure_mode


def test_urandom_noise_is_secure_unrepeatable_and_of_the_right_size(silo, start):
    """The OS-CSPRNG noise: two runs differ whatever the seed, and by as much as two seeded runs
    with different seeds do (same σ; a missing or mis-scaled noise would change the spread)."""
    users = list(silo.trainable)
    big = dict(noise_multiplier=4.0, epochs=2)  # noise dominates the differences
    u1, u2 = (run(start, users, seed=3, noise_source="urandom", **big) for _ in range(2))
    s1, s2 = run(start, users, seed=3, **big), run(start, users, seed=4, **big)
    assert u1.noise_source == "urandom" and u1.secure_mode and not s1.secure_mode
    assert not np.array_equal(u1.update.embeddings, u2.update.embeddings)
    spread_u = np.std(flat(u1.update) - flat(u2.update))
    spread_s = np.std(flat(s1.update) - flat(s2.update))
    assert 0.85 < spread_u / spread_s < 1.15
    with pytest.raises(ValueError, match="noise_source"):
        run(start, users, noise_source="dev-random")


# ---------------------------------------------------------------- (3, 4) accounting

def test_history_is_restored_so_epsilon_composes_across_rounds(silo, start):
    users = list(silo.trainable)
    first = run(start, users, server_round=1)
    second = run(start, users, history=first.history, server_round=2, noise_multiplier=1.3)
    alone = run(start, users, server_round=2, noise_multiplier=1.3)
    assert first.history == [(1.0, first.sample_rate, first.steps)]
    assert second.history == [*first.history, (1.3, second.sample_rate, second.steps)]
    both = silo_ledger(second.delta)
    both.record(first.event)
    both.record(second.event)
    assert second.epsilon == pytest.approx(both.epsilon(), rel=0.01)
    assert second.epsilon > alone.epsilon * 1.1 and second.epsilon > first.epsilon  # it did not restart
    assert alone.epsilon == pytest.approx(alone.ledger_epsilon, rel=0.01)


@pytest.mark.parametrize("sigma, rate, epochs", [(1.0, 0.1, 1), (0.8, 0.05, 2), (2.0, 0.25, 3)])
def test_opacus_epsilon_agrees_with_our_ledger(silo, start, sigma, rate, epochs):
    result = run(start, list(silo.trainable), noise_multiplier=sigma, sample_rate=rate, epochs=epochs)
    assert result.steps == epochs * round(1 / result.sample_rate)
    assert 0 < result.epsilon == pytest.approx(result.ledger_epsilon, rel=0.01)
    assert ledger_from_history(result.history, delta=result.delta).epsilon() == result.ledger_epsilon


# ---------------------------------------------------------------- (5) it is the non-DP gradient

@huge_epsilon_ok
def test_without_noise_or_clipping_the_update_follows_the_gradient(silo, start):
    """σ ≈ 0 and C above every user's gradient norm (checked): DP-SGD is plain SGD over users. One
    full-batch step is −lr/U × the non-DP gradient; Poisson-sampled steps with a small lr add up to
    the same direction; real noise does not."""
    users = list(silo.trainable)
    clip = 1e4
    assert max(np.linalg.norm(g) for g in user_gradients(start, users)) < clip
    reference, _, _ = local_item_update(start, users, loss="softmax", user_reg=REG, epochs=1, lr=1.0,
                                        rng=np.random.default_rng(0))
    n = len(users)

    # lr large enough that new − old keeps float32 precision (it is a single step)
    full = run(start, users, sample_rate=1.0, noise_multiplier=1e-9, max_grad_norm=clip, lr=0.1)
    assert full.steps == 1 and cosine(full.update, reference) > 0.999
    np.testing.assert_allclose(flat(full.update) * n / 0.1, flat(reference), rtol=1e-3, atol=1e-4)

    sampled = run(start, users, sample_rate=0.25, epochs=8, noise_multiplier=1e-9, max_grad_norm=clip, lr=1e-3)
    assert sampled.steps == 32 and cosine(sampled.update, reference) > 0.9

    noisy = run(start, users, sample_rate=0.25, epochs=8, noise_multiplier=5.0, max_grad_norm=0.1, lr=1e-3)
    assert cosine(noisy.update, reference) < 0.5  # the check above is not vacuous


# ---------------------------------------------------------------- (6) a silo learns under DP

def test_a_silo_learns_to_rank_under_user_level_dp(silo, start):
    users, model = list(silo.trainable), ModelConfig(dim=DIM, user_reg=REG)

    def ndcg(params: ItemParams) -> float:
        sums = client_evaluate(params, silo, model=model, phase="valid", seed=0)
        return sums["ndcg@10"] / sums["users"]

    params, history, losses, epsilons = start.copy(), [], [], []
    for server_round in range(1, 6):
        # 30 users: half of them per step, so the noise (σC over ~15 users) leaves a signal
        result = run(params, users, lr=1.0, sample_rate=0.5, seed=server_round, history=history,
                     server_round=server_round)
        history = result.history
        params = ItemParams(params.embeddings + result.update.embeddings, params.bias + result.update.bias)
        losses.append(result.mean_loss)
        epsilons.append(result.epsilon)
    assert np.all(np.diff(epsilons) > 0)  # each round adds to the same budget
    assert losses[-1] < losses[0]
    assert ndcg(params) > ndcg(start) + 0.1, (ndcg(start), ndcg(params))
