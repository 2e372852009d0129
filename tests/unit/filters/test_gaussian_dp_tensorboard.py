"""GaussianDPFilter streams the cumulative epsilon to the job's LogWriter, after charging and never instead of it."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey
from nvflare.apis.fl_context import FLContext

from fedseg3d.filters.gaussian_dp import GaussianDPFilter
from fedseg3d.privacy.ledger import PrivacyLedger
from fedseg3d.privacy.site_budget import PRIVACY_DIR_ENV, write_site_budget


class RecordingWriter:
    """Stands in for FLARE's TBWriter: records what would be streamed."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar: float, global_step: int | None = None, **kwargs) -> None:
        self.scalars.append((tag, scalar, global_step))


class Engine:
    def __init__(self, components: dict) -> None:
        self.components = components

    def get_component(self, component_id: str):
        return self.components.get(component_id)


def context(engine: Engine) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-a", private=False, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return ctx


def result(round_: int):
    data = {"w": np.ones((3, 3), dtype=np.float32)}
    shareable = DXO(DataKind.WEIGHT_DIFF, data).to_shareable()
    shareable.set_header(FLMetaKey.CURRENT_ROUND, round_)
    return shareable


@pytest.fixture
def privacy_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(PRIVACY_DIR_ENV, str(tmp_path))
    write_site_budget(tmp_path / "site-1", epsilon_budget=100.0, delta=1e-5)
    return tmp_path


def test_cumulative_epsilon_is_streamed_per_round(privacy_dir):
    writer = RecordingWriter()
    dp = GaussianDPFilter(clip_norm=1.0, noise_multiplier=1.0, tb_writer_id="tb_writer")
    released = [from_shareable(dp.process(result(r), context(Engine({"tb_writer": writer})))) for r in (0, 1)]
    assert writer.scalars == [
        ("dp_epsilon_site_update", pytest.approx(out.get_meta_prop("dp_epsilon")), r) for r, out in enumerate(released)
    ]


def test_a_wrong_writer_id_fails_before_anything_is_charged(privacy_dir):
    dp = GaussianDPFilter(clip_norm=1.0, noise_multiplier=1.0, tb_writer_id="tb_writer")
    with pytest.raises(ValueError, match="tb_writer_id 'tb_writer' does not name"):
        dp.process(result(0), context(Engine({})))
    assert PrivacyLedger(privacy_dir / "site-1" / "privacy_ledger.json").entries() == []
