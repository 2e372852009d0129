"""fedseg3d.tools.pretrain on tiny public data: a checkpoint the job's persistor accepts, scored on private sites."""

import json
from pathlib import Path

import pytest

from fedseg3d.data.synthetic import generate_sites
from fedseg3d.models.checkpoint import check_state_matches, checkpoint_provenance, load_checkpoint_state
from fedseg3d.models.presets import PresetUNet
from fedseg3d.tools.pretrain import evaluate_checkpoint, main, pooled_datalist, pretrain

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("public")
    generate_sites(root, n_sites=1, seed=99, fov_mm=32.0, cases_scale=0.2, dicom_sites=())
    return root / "site-1"


def test_pretrained_checkpoint_fits_the_job_and_scores_on_private_sites(public_dir, tiny_sites, tmp_path):
    out = tmp_path / "public_instancenorm.pt"
    result = pretrain(
        [public_dir], REPO / "jobs" / "unet3d_dpsgd", out, epochs=1, seed=3, device="cpu", log=lambda _: None
    )
    provenance = checkpoint_provenance(out)
    assert provenance["model_preset"] == "unet3d_tiny_instancenorm"  # the job's preset by default
    assert provenance["epochs"] == 1 and provenance["seed"] == 3 and provenance["learning_rate"] == 0.002
    assert provenance["train_cases"] == 2 and len(result.per_epoch_dice) == 1
    assert json.loads(Path(f"{out}.json").read_text())["model_preset"] == "unet3d_tiny_instancenorm"
    # what the server's persistor will check
    check_state_matches(PresetUNet("unet3d_tiny_instancenorm", 3).state_dict(), load_checkpoint_state(out), out, "")
    scores = evaluate_checkpoint(out, [tiny_sites / "site-1", tiny_sites / "site-2"], REPO / "jobs" / "unet3d_dpsgd")
    assert set(scores) == {"site-1", "site-2"}
    assert all(0.0 <= s.mean_dice <= 1.0 and set(s.class_dice) == {"organ", "lesion"} for s in scores.values())


def test_cli_overrides_the_preset_and_names_bad_folders(public_dir, tmp_path, capsys):
    out = tmp_path / "bn.pt"
    main(["--data", str(public_dir), "--job", str(REPO / "jobs" / "unet3d_fedbn"), "--out", str(out)]
         + ["--model-preset", "unet3d_tiny", "--epochs", "1", "--device", "cpu"])  # fmt: skip
    assert checkpoint_provenance(out)["model_preset"] == "unet3d_tiny"
    assert "running_mean" in " ".join(load_checkpoint_state(out))  # batch norm travels in the checkpoint
    with pytest.raises(ValueError, match="has no datalist.json"):
        pooled_datalist([tmp_path], {0: "background", 1: "organ", 2: "lesion"})
