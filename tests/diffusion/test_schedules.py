"""Noise schedules and respacing, checked in float64 against the papers and improved-diffusion."""
import math
import random

import numpy as np
import pytest

from gaussdiff import UsageError, make_diffusion
from gaussdiff.diffusion.schedules import beta_schedule, betas_from_alphas_cumprod, space_timesteps


# ---------------------------------------------------------------------------------------- β tables
@pytest.mark.parametrize("T", [1000, 4000, 250, 50])
def test_linear_schedule_endpoints_scale_with_T(T):
    """Linear: β_1 = 1e-4 · 1000/T, β_T = 0.02 · 1000/T, equally spaced (DDPM; Improved DDPM
    scales both ends by 1000/T so every T gives the same ᾱ curve)."""
    b = beta_schedule("linear", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert b[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    step = (0.02 - 1e-4) * 1000 / T / (T - 1)
    np.testing.assert_allclose(np.diff(b), step, rtol=1e-9)


def test_linear_schedule_same_curve_for_any_T():
    """Scaling the ends by 1000/T makes ᾱ(t/T) nearly T-independent: ᾱ at the midpoint and the end
    of T = 4000 matches T = 1000 to within the O(1/T) discretisation error."""
    a1 = np.cumprod(1 - beta_schedule("linear", 1000))
    a4 = np.cumprod(1 - beta_schedule("linear", 4000))
    assert a4[1999] == pytest.approx(a1[499], rel=0.02)
    assert np.log(a4[-1]) == pytest.approx(np.log(a1[-1]), rel=0.01)


def _cosine_f(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [1000, 4000, 100])
def test_cosine_schedule_is_improved_ddpm_eq17(T):
    """Cosine: ᾱ_t = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008
    (Improved DDPM eq. 17), with β_t = 1 - ᾱ_t/ᾱ_{t-1} capped at 0.999."""
    b = beta_schedule("cosine", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert np.all(b > 0) and np.all(b <= 0.999)
    alpha_bar = np.array([_cosine_f(t / T) / _cosine_f(0.0) for t in range(1, T + 1)])
    capped = b >= 0.999
    # f(1) = cos²(π/2) ≈ 0, so only the last step hits the cap
    assert capped[-1] and not capped[:-1].any()
    np.testing.assert_allclose(np.cumprod(1 - b)[:-1], alpha_bar[:-1], rtol=1e-10)
    assert b[-1] == 0.999


def test_betas_from_alphas_cumprod_round_trip():
    """betas_from_alphas_cumprod inverts ᾱ_t = Π_{s≤t}(1 - β_s)."""
    rng = np.random.default_rng(0)
    betas = rng.uniform(1e-4, 0.2, size=37)
    a = np.cumprod(1 - betas)
    np.testing.assert_allclose(betas_from_alphas_cumprod(a), betas, rtol=1e-10)
    with pytest.raises(UsageError):
        betas_from_alphas_cumprod([0.9, 0.95])     # increasing
    with pytest.raises(UsageError):
        betas_from_alphas_cumprod([0.9, 0.0])      # ᾱ must stay > 0


def test_linear_schedule_needs_beta_below_one():
    """β_T = 0.02·1000/T reaches 1 at T = 20: then ᾱ_T = 0 and x_0 = (x_t - sqrt(1-ᾱ)ε)/sqrt(ᾱ) is
    NaN. T ≤ 20 must be refused with a UsageError (not sampled as NaN); T = 21 works, and a
    diffusion built from β = 1 directly is refused too."""
    for T in (20, 10):
        with pytest.raises(UsageError, match="linear"):
            beta_schedule("linear", T)
    d = make_diffusion("linear", 21)
    assert d.betas[-1] < 1 and np.all(np.isfinite(d.sqrt_recip_alphas_cumprod))
    with pytest.raises(UsageError):
        make_diffusion(alphas_cumprod=None, steps=20)
    from gaussdiff import GaussianDiffusion
    with pytest.raises(UsageError):
        GaussianDiffusion(np.array([0.1, 0.5, 1.0]))


def test_unknown_schedule_is_a_usage_error():
    """Unknown names and non-positive T are user errors, not tracebacks."""
    with pytest.raises(UsageError):
        beta_schedule("quadratic", 10)
    with pytest.raises(UsageError):
        beta_schedule("linear", 0)


# ---------------------------------------------------------------------------------------- respacing
def reference_space_timesteps(num_steps, spacing):
    """improved-diffusion's space_timesteps, written from its documented algorithm
    (docs/conventions.md), independently of gaussdiff's code."""
    if spacing.startswith("ddim"):
        n = int(spacing[4:])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == n:
                return sorted(range(0, num_steps, stride))
        raise ValueError("no stride")
    counts = [int(c) for c in spacing.split(",")]
    parts = len(counts)
    sizes = [num_steps // parts + (1 if i < num_steps % parts else 0) for i in range(parts)]
    out, offset = set(), 0
    for size, k in zip(sizes, counts):
        assert k <= size
        stride = 1 if k == 1 else (size - 1) / (k - 1)
        acc = 0.0
        for _ in range(k):
            out.add(offset + round(acc))   # Python round: half to even
            acc += stride
        offset += size
    return sorted(out)


@pytest.mark.parametrize("T, spacing, expected", [
    (1000, "ddim50", list(range(0, 1000, 20))),
    (1000, "ddim100", list(range(0, 1000, 10))),
    (4000, "ddim250", list(range(0, 4000, 16))),
    (10, "ddim3", [0, 4, 8]),                 # strides 1, 2, 3 give 10, 5, 4 steps; 4 gives 3
    (10, "3", [0, 4, 9]),                     # stride 9/2 = 4.5: 0, round(4.5) = 4, 9
    (7, "5", [0, 2, 3, 4, 6]),                # stride 1.5: 0, 1.5->2, 3, 4.5->4 (half to even), 6
    (10, "2,3", [0, 4, 5, 7, 9]),             # parts [0,5) and [5,10): 0,4 and 5,7,9
    (11, "2,3", [0, 5, 6, 8, 10]),            # parts of 6 and 5 steps
    (100, "10", list(range(0, 100, 11))),     # stride 99/9 = 11
    (1000, "1000", list(range(1000))),
    (10, "1", [0]),
])
def test_space_timesteps_known_values(T, spacing, expected):
    """Values worked out by hand from improved-diffusion's algorithm."""
    assert space_timesteps(T, spacing) == expected
    assert reference_space_timesteps(T, spacing) == expected


def test_space_timesteps_matches_reference_on_many_cases():
    """gaussdiff.space_timesteps == improved-diffusion's algorithm on random (T, spacing)."""
    rng = random.Random(1234)
    cases = [(T, s) for T in (1000, 4000, 250) for s in ("25", "50", "100", "250", "ddim25",
                                                           "ddim50", "10,15,20,25")]
    while len(cases) < 400:
        T = rng.randint(1, 1200)
        parts = rng.randint(1, min(5, T))
        sizes = [T // parts + (1 if i < T % parts else 0) for i in range(parts)]
        counts = [rng.randint(1, size) for size in sizes]
        cases.append((T, ",".join(map(str, counts))))
        n = rng.randint(2, T) if T > 2 else None
        if n is not None and any(len(range(0, T, i)) == n for i in range(1, T)):
            cases.append((T, f"ddim{n}"))
    for T, s in cases:
        assert space_timesteps(T, s) == reference_space_timesteps(T, s), (T, s)


def test_space_timesteps_rejects_impossible_requests():
    """Asking for more steps than a section has, or an unreachable ddimN, is a user error."""
    with pytest.raises(UsageError):
        space_timesteps(10, "11")
    with pytest.raises(UsageError):
        space_timesteps(10, "6,6")
    with pytest.raises(UsageError):
        space_timesteps(10, "ddim7")     # no integer stride gives 7 of 10 steps
    with pytest.raises(UsageError):
        space_timesteps(10, "fast")


@pytest.mark.parametrize("schedule, T, spacing", [("linear", 1000, "ddim50"), ("cosine", 1000, "10,15,20"),
                                                  ("cosine", 4000, "250"), ("linear", 100, "7")])
def test_respaced_alphas_cumprod_equal_original_at_kept_steps(schedule, T, spacing):
    """Respacing keeps the marginals: ᾱ of the respaced diffusion at its i-th step equals the
    original ᾱ at timestep_map[i], and its β_i = 1 - ᾱ_{map[i]} / ᾱ_{map[i-1]}."""
    orig = np.cumprod(1 - beta_schedule(schedule, T))
    d = make_diffusion(schedule, T, respacing=spacing)
    kept = np.array(space_timesteps(T, spacing))
    np.testing.assert_array_equal(d.timestep_map, kept)
    assert d.num_timesteps == len(kept) and d.original_num_steps == T
    np.testing.assert_allclose(d.alphas_cumprod, orig[kept], rtol=1e-10)
    np.testing.assert_allclose(d.betas, 1 - orig[kept] / np.append(1.0, orig[kept][:-1]), rtol=1e-12)
