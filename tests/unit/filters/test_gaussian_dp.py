"""GaussianDPFilter on real DXOs and a bare FLContext: clipping bound, noise scale, ledger, every fail-closed path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.workspace import Workspace
from opacus.accountants import RDPAccountant

from fedseg3d.filters.gaussian_dp import PRIVACY_DIR_ENV, GaussianDPFilter
from fedseg3d.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger, PrivacyLedgerError

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _no_privacy_dir(monkeypatch):
    monkeypatch.delenv(PRIVACY_DIR_ENV, raising=False)


def _ctx(site: str = "site-1", job_id: str = "job-a", engine=None) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    if engine is not None:
        ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return ctx


def _diff(data: dict, kind: str = DataKind.WEIGHT_DIFF, round_: int | None = 0) -> Shareable:
    shareable = DXO(kind, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 7}).to_shareable()
    if round_ is not None:
        shareable.set_header(FLMetaKey.CURRENT_ROUND, round_)
    return shareable


def _update(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (4, 2, 3, 3, 3), "conv.bias": (4,), "head.weight": (3, 4, 1, 1, 1), "scalar": ()}
    return {k: np.asarray(rng.standard_normal(s) * scale, dtype=np.float32) for k, s in shapes.items()}


def _norm(arrays: dict) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, dtype=np.float64) ** 2)) for a in arrays.values()))


def _rdp(sigma: float, rounds: int) -> float:
    engine = RDPAccountant()
    engine.history = [(sigma, 1.0, rounds)]
    return engine.get_epsilon(delta=DELTA)


def _write_budget(folder, epsilon_budget: float, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "privacy_budget.json").write_text(json.dumps({"epsilon_budget": epsilon_budget, "delta": DELTA, **extra}))


class _Engine:
    """Just enough engine for the filter: FLARE's own Workspace over a temp site folder."""

    def __init__(self, root):
        (root / "startup").mkdir(parents=True, exist_ok=True)
        (root / "local").mkdir(exist_ok=True)
        self.workspace = Workspace(str(root), site_name="site-1")

    def get_workspace(self) -> Workspace:
        return self.workspace


# --- the mechanism ---------------------------------------------------------------------------------------------


def test_clipping_bounds_the_global_norm_and_keeps_the_direction():
    update = _update(scale=10.0)
    assert _norm(update) > 50
    dp = GaussianDPFilter(clip_norm=0.5, noise_multiplier=0.0, allow_no_noise=True)
    out = from_shareable(dp.process(_diff(update), _ctx())).data
    assert _norm(out) <= 0.5
    assert _norm(out) == pytest.approx(0.5, rel=1e-5)
    factor = 0.5 / _norm(update)
    for key, value in update.items():
        np.testing.assert_allclose(out[key], value * factor, rtol=1e-5, atol=1e-7)


def test_small_update_is_not_scaled():
    update = _update(scale=0.01)
    dp = GaussianDPFilter(clip_norm=10.0, noise_multiplier=0.0, allow_no_noise=True)
    out = from_shareable(dp.process(_diff(update), _ctx())).data
    for key, value in update.items():
        np.testing.assert_array_equal(out[key], value)


def test_noise_has_the_configured_std():
    sigma, clip = 1.5, 0.7
    zeros = {"a": np.zeros((200, 250), np.float32), "b": np.zeros((50_000,), np.float32)}  # 100,000 elements
    dp = GaussianDPFilter(clip_norm=clip, noise_multiplier=sigma, seed=1234)
    out = from_shareable(dp.process(_diff(zeros), _ctx())).data
    noise = np.concatenate([v.ravel().astype(np.float64) for v in out.values()])
    assert noise.size == 100_000
    assert abs(noise.std() - sigma * clip) / (sigma * clip) < 0.02
    assert abs(noise.mean()) < 4 * sigma * clip / math.sqrt(noise.size)


def test_noise_is_added_after_clipping():
    sigma, clip = 2.0, 0.1
    huge = {"w": np.full((100_000,), 100.0, np.float32)}
    out = from_shareable(GaussianDPFilter(clip, sigma, seed=3).process(_diff(huge), _ctx())).data["w"]
    assert out.std() == pytest.approx(sigma * clip, rel=0.02)  # noise is not scaled down with the update
    assert out.mean() == pytest.approx(clip / math.sqrt(huge["w"].size), abs=4 * sigma * clip / math.sqrt(out.size))


def test_fresh_noise_every_round_and_seed_reproducible():
    update = _update()
    first = GaussianDPFilter(1.0, 1.0, seed=7)
    again = GaussianDPFilter(1.0, 1.0, seed=7)
    round0 = from_shareable(first.process(_diff(update), _ctx())).data
    round1 = from_shareable(first.process(_diff(update), _ctx())).data
    replay = from_shareable(again.process(_diff(update), _ctx())).data
    assert not np.array_equal(round0["conv.weight"], round1["conv.weight"])
    np.testing.assert_array_equal(round0["conv.weight"], replay["conv.weight"])


def test_keys_shapes_dtypes_and_meta_are_kept():
    update = _update()
    update["f64"] = np.ones((2, 2), np.float64)
    out = from_shareable(GaussianDPFilter(1.0, 1.0).process(_diff(update), _ctx()))
    assert out.data_kind == DataKind.WEIGHT_DIFF
    assert set(out.data) == set(update)
    for key, value in update.items():
        assert isinstance(out.data[key], np.ndarray)
        assert (out.data[key].shape, out.data[key].dtype) == (value.shape, value.dtype)
    assert out.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 7
    assert out.get_meta_prop("dp_unit") == "site_update"
    assert out.get_meta_prop("dp_scope") == "job"
    assert out.get_meta_prop("dp_delta") == DELTA
    assert out.get_meta_prop("dp_epsilon") == pytest.approx(_rdp(1.0, 1))
    assert "GaussianDPFilter" in out.get_filter_history()


def test_without_budget_epsilon_composes_over_the_jobs_rounds():
    dp = GaussianDPFilter(1.0, 2.0)
    for _ in range(3):
        meta_eps = from_shareable(dp.process(_diff(_update()), _ctx())).get_meta_prop("dp_epsilon")
    assert meta_eps == pytest.approx(_rdp(2.0, 3), rel=1e-12)


def test_replace_neighbouring_accounts_with_half_the_noise():
    dp = GaussianDPFilter(1.0, 2.0, neighbouring="replace")
    eps = from_shareable(dp.process(_diff(_update()), _ctx())).get_meta_prop("dp_epsilon")
    assert eps == pytest.approx(_rdp(1.0, 1), rel=1e-12)


# --- fail closed -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0},
        {"clip_norm": -1.0, "noise_multiplier": 1.0},
        {"clip_norm": math.nan, "noise_multiplier": 1.0},
        {"clip_norm": math.inf, "noise_multiplier": 1.0},
        {"clip_norm": True, "noise_multiplier": 1.0},
        {"clip_norm": "1.0", "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": -0.1},
        {"clip_norm": 1.0, "noise_multiplier": math.nan},
        {"clip_norm": 1.0, "noise_multiplier": 0.0},
        {"clip_norm": 1.0, "noise_multiplier": 0.0, "allow_no_noise": "yes"},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "seed": -1},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "neighbouring": "swap"},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant": "moments"},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "require_budget": 1},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "pass_data_kinds": ["WEIGHTS"]},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "pass_data_kinds": ["WEIGHT_DIFF"]},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        GaussianDPFilter(**kwargs)


def test_full_weights_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="params_transfer_type"):
        GaussianDPFilter(1.0, 1.0).process(_diff(_update(), kind=DataKind.WEIGHTS), _ctx())


@pytest.mark.parametrize(
    "data, error, match",
    [
        ({"w": np.array([1.0, np.nan], np.float32)}, ValueError, "NaN"),
        ({"w": np.array([1.0, np.inf], np.float32)}, ValueError, "NaN or infinity"),
        ({"w": np.ones(2, np.float32), "num_batches_tracked": np.array(3, np.int64)}, TypeError, "int64"),
        ({"w": np.ones(2, np.float32), "mask": np.ones(2, bool)}, TypeError, "bool"),
        ({"w": torch.ones(2)}, TypeError, "numpy"),
        ({"w": [1.0, 2.0]}, TypeError, "numpy"),
        ({}, ValueError, "empty"),
    ],
)
def test_bad_updates_raise(data, error, match):
    with pytest.raises(error, match=match):
        GaussianDPFilter(1.0, 1.0).process(_diff(data), _ctx())


def test_metrics_are_refused_unless_listed():
    metrics = DXO(DataKind.METRICS, {"val_dice": 0.8}).to_shareable()
    with pytest.raises(ValueError, match="METRICS"):
        GaussianDPFilter(1.0, 1.0).process(metrics, _ctx())
    passed = GaussianDPFilter(1.0, 1.0, pass_data_kinds=["METRICS"]).process(metrics, _ctx())
    assert from_shareable(passed).data == {"val_dice": 0.8}


def test_non_dxo_content_is_refused_but_empty_replies_pass():
    raw = Shareable({"weights": np.ones(3)})
    with pytest.raises(ValueError, match="not a DXO"):
        GaussianDPFilter(1.0, 1.0).process(raw, _ctx())
    empty = make_reply(ReturnCode.OK)
    assert GaussianDPFilter(1.0, 1.0).process(empty, _ctx()) is empty


def test_error_reply_leaves_without_its_payload():
    failed = _diff(_update())
    failed.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    out = GaussianDPFilter(1.0, 1.0).process(failed, _ctx())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "DXO" not in out


# --- the site ledger -------------------------------------------------------------------------------------------


def test_ledger_from_env_dir_is_charged_every_round(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    _write_budget(tmp_path / "site-1", epsilon_budget=100.0)
    dp = GaussianDPFilter(clip_norm=1.0, noise_multiplier=1.0)
    for r in range(3):
        out = from_shareable(dp.process(_diff(_update(), round_=r), _ctx()))
    assert out.get_meta_prop("dp_scope") == "site_ledger"
    assert out.get_meta_prop("dp_epsilon") == pytest.approx(_rdp(1.0, 3), rel=1e-12)
    entries = PrivacyLedger(tmp_path / "site-1" / "privacy_ledger.json").entries()
    assert [(e.job_id, e.round, e.unit) for e in entries] == [("job-a", r, "site_update") for r in range(3)]
    assert entries[0].details["clip_norm"] == 1.0 and entries[0].details["site"] == "site-1"


def test_site_local_budget_wins_and_spans_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path / "elsewhere"))  # must be ignored: local/ comes first
    engine = _Engine(tmp_path / "ws")
    _write_budget(tmp_path / "ws" / "local", epsilon_budget=_rdp(2.0, 2) + 1e-9)  # two rounds at sigma = 2
    ledger_path = tmp_path / "ws" / "local" / "privacy_ledger.json"

    out = GaussianDPFilter(1.0, 2.0).process(_diff(_update()), _ctx(job_id="job-a", engine=engine))
    assert from_shareable(out).get_meta_prop("dp_epsilon") == pytest.approx(_rdp(2.0, 1))
    out = GaussianDPFilter(1.0, 2.0).process(_diff(_update()), _ctx(job_id="job-b", engine=engine))
    assert from_shareable(out).get_meta_prop("dp_epsilon") == pytest.approx(_rdp(2.0, 2))
    before = ledger_path.read_bytes()

    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        GaussianDPFilter(1.0, 2.0).process(_diff(_update()), _ctx(job_id="job-c", engine=engine))
    assert ledger_path.read_bytes() == before
    assert [e.job_id for e in PrivacyLedger(ledger_path).entries()] == ["job-a", "job-b"]
    assert not (tmp_path / "elsewhere").exists()


def test_zero_noise_is_refused_by_a_budget(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    _write_budget(tmp_path / "site-1", epsilon_budget=1e6)
    dp = GaussianDPFilter(1.0, 0.0, allow_no_noise=True)
    with pytest.raises(PrivacyBudgetExceeded):
        dp.process(_diff(_update()), _ctx())


def test_required_budget_missing_raises():
    with pytest.raises(RuntimeError, match="require_budget"):
        GaussianDPFilter(1.0, 1.0, require_budget=True).process(_diff(_update()), _ctx())


def test_env_dir_without_site_budget_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="site-1"):
        GaussianDPFilter(1.0, 1.0).process(_diff(_update()), _ctx())


def test_corrupt_ledger_or_budget_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    _write_budget(tmp_path / "site-1", epsilon_budget=10.0)
    (tmp_path / "site-1" / "privacy_ledger.json").write_text('{"format": "fedseg3d-privacy-ledger", "entr')
    with pytest.raises(PrivacyLedgerError, match="privacy_ledger.json"):
        GaussianDPFilter(1.0, 1.0).process(_diff(_update()), _ctx())
    (tmp_path / "site-1" / "privacy_budget.json").write_text("[]")
    with pytest.raises(PrivacyLedgerError, match="privacy_budget.json"):
        GaussianDPFilter(1.0, 1.0).process(_diff(_update()), _ctx())
