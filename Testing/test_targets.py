"""Targets: the catalogue, the input-kind rule, the guard, terminology in the output, presence.

Real weights, real MRML, real data from ../shared/data; nothing swapped for what production picks.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, shared_path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SAMSelfPromptLib.cli.main", *args], cwd=REPO / "SAMSelfPrompt",
                          capture_output=True, text=True, timeout=600)


def test_every_target_names_its_structures_with_snomed_codes():
    from SAMSelfPromptLib.weights.targets import TARGETS

    assert {t.name for t in TARGETS} >= {"dermoscopy-lesion", "breast-lesion-us", "fetal-head-us", "left-atrium-mr",
                                        "cardiac-mr", "liver-ct"}
    for t in TARGETS:
        assert t.kinds and t.terms and t.citation and t.structures
        for s in t.structures:
            assert s.category[0] == "SCT" and s.category[1].isdigit()
            assert s.type[0] == "SCT" and s.type[1].isdigit() and s.type[2]
            assert f"SCT^{s.type[1]}^{s.type[2]}" in s.terminology_entry()
    acdc = next(t for t in TARGETS if t.name == "cardiac-mr")
    assert acdc.noncommercial and "NON-COMMERCIAL" in acdc.terms
    assert [s.name for s in acdc.structures] == ["Right ventricle", "Myocardium", "Left ventricle"]


@pytest.mark.parametrize("modality, rgb, array, kind", [
    (None, True, None, "RGB"),
    ("XC", True, None, "RGB"),  # a dermoscopy photo filed as DICOM XC is still a colour picture
    ("CT", False, np.zeros((3, 4, 4)), "CT"),
    ("MR", False, np.zeros((3, 4, 4)), "MR"),
    ("US", False, np.zeros((1, 4, 4)), "US"),
    (None, False, np.full((3, 4, 4), -1024), "CT"),  # air in HU: only CT goes below -500
    (None, False, np.zeros((1, 8, 8), np.uint8), "US"),  # a single grey picture
    (None, False, np.zeros((5, 8, 8), np.uint8), "MR"),  # a grey volume without HU
])
def test_input_kind_rule(modality, rgb, array, kind):
    from SAMSelfPromptLib.weights.catalogue import input_kind

    assert input_kind(modality, rgb, array) == kind


def test_defaults_per_kind_and_the_guard_refuses_what_nothing_fits():
    from SAMSelfPromptLib.weights.catalogue import NoTargetError, choose_model, shipped_targets

    ct = choose_model(modality="CT")
    assert ct.target.name == "liver-ct" and ct.target.structures[0].name == "Liver"
    assert choose_model(modality=None, is_rgb=True).target.name == "dermoscopy-lesion"
    with pytest.raises(NoTargetError) as err:
        choose_model(modality="PT")  # no PET target exists
    message = str(err.value)
    assert "PT" in message and "Adapt" in message and "--force-target" in message
    for t in shipped_targets():
        assert t.name in message
    # A named target on an input it was not trained for is refused, unless forced.
    with pytest.raises(NoTargetError, match="--force-target"):
        choose_model(modality="MR", target="liver-ct")
    forced = choose_model(modality="MR", target="liver-ct", force_target=True)
    assert forced.forced and forced.target.name == "liver-ct"


def test_ultrasound_and_mr_need_a_chosen_target_when_one_fits(tmp_path):
    """Grey ultrasound and MR pictures of different organs look alike to the kind rule: with a target
    for the kind shipped, none is assumed; the message names them and Adapt."""
    from SAMSelfPromptLib.weights.catalogue import (NoTargetError, Target, choose_model, default_target,
                                                   targets_for)
    from SAMSelfPromptLib.weights.targets import target_spec

    fake = Target.from_summary("la", tmp_path / "la.pt", {"target": target_spec("left-atrium-mr").to_dict()})
    assert default_target("MR", (fake,)) is None and targets_for("MR", (fake,))
    with pytest.raises(NoTargetError, match="Choose one") as err:
        choose_model(modality="MR", extra_targets=(fake,))
    assert "left-atrium-mr" in str(err.value) and "Adapt" in str(err.value)
    assert default_target("CT").name == "liver-ct" and default_target("RGB").name == "dermoscopy-lesion"


def test_segment_on_mr_paints_nothing_or_exits_2_naming_targets_and_adapt(tmp_path):
    """The must-show: mr_small (an abdominal MR) gets no CT model painting a liver on every slice."""
    mr = shared_path("ct_totalseg", "mr_small.nii.gz")
    out = tmp_path / "mr.seg.nrrd"
    res = _cli("segment", str(mr), "-o", str(out), "--quiet", "--threads", "1")
    if res.returncode == 2:  # no MR target, or several for different anatomy and none assumed
        assert "Nothing was painted" in res.stderr and "Adapt" in res.stderr, res.stderr
        assert ("liver-ct" in res.stderr) or ("left-atrium-mr" in res.stderr), res.stderr
        assert not out.exists()
    else:  # an MR target fits by kind: its presence output must leave the abdomen empty
        assert res.returncode == 0, res.stderr
        import slicerio

        seg = slicerio.read_segmentation(str(out))
        assert not np.asarray(seg["voxels"]).any(), res.stdout
    forced = _cli("segment", str(mr), "-o", str(tmp_path / "f.seg.nrrd"), "--target", "liver-ct", "--quiet")
    assert forced.returncode == 2 and "is for CT input" in forced.stderr and "--force-target" in forced.stderr


def test_segment_writes_the_targets_name_colour_and_terminology(tmp_path):
    import slicerio

    ct = shared_path("ct_totalseg", "ct.nii.gz")
    out = tmp_path / "liver.seg.nrrd"
    res = _cli("segment", str(ct), "-o", str(out), "--slices", "9:11", "--quiet", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert "Liver (CT) [liver-ct]" in res.stdout
    seg = slicerio.read_segmentation(str(out))
    (segment,) = seg["segments"]
    assert segment["name"] == "Liver"
    assert np.allclose(segment["color"], (0.87, 0.51, 0.4), atol=1e-3)
    assert segment["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]


def test_logic_names_colours_and_tags_the_segment_from_the_target(logic, ct_node):
    import slicer
    from vtk import reference

    run = logic.wait(logic.start_auto_segment(ct_node, slice_range=(9, 10)), timeout=600)
    assert run.status == "done", run.error
    node = slicer.mrmlScene.GetNodeByID(run.segmentation_id)
    segment = node.GetSegmentation().GetSegment(run.segment_id)
    assert segment.GetName() == "Liver"
    assert np.allclose(segment.GetColor(), (0.87, 0.51, 0.4), atol=1e-3)
    terminology = segment.GetTerminology()
    assert "10200004" in terminology and "Liver" in terminology and "123037004" in terminology
    choices = logic.targets_for(ct_node)
    assert choices and choices[0].name == "liver-ct"


def test_models_lists_targets_with_metrics_and_terms():
    res = _cli("models")
    assert res.returncode == 0, res.stderr
    for name in ("dermoscopy-lesion", "breast-lesion-us", "fetal-head-us", "left-atrium-mr", "cardiac-mr", "liver-ct"):
        assert name in res.stdout
    assert "val samsp Dice" in res.stdout
    cardiac = res.stdout[res.stdout.index("cardiac-mr"):res.stdout.index("liver-ct")]
    assert "NON-COMMERCIAL USE ONLY" in cardiac


def test_target_samples_give_one_sample_per_structure_with_negatives():
    from SAMSelfPromptLib.training.targets import volume_cases
    from SAMSelfPromptLib.weights.targets import target_spec

    root = shared_path("acdc")
    spec = target_spec("cardiac-mr")
    (case,) = volume_cases(spec, root, ["patient013_frame01"])
    n_slices = len(case) // 3
    assert {s.structure for s in case} == {0, 1, 2}
    assert all(s.case_id.endswith(spec.structures[s.structure].name) for s in case)
    assert any(not s.has_label for s in case)  # slices without a structure are its negatives
    first_rv, first_lv = case[0], case[2 * n_slices]
    assert first_rv.image is not None and np.array_equal(first_rv.image, first_lv.image)


def test_a_denser_negative_step_adds_only_slices_without_the_structure():
    from SAMSelfPromptLib.training.targets import volume_cases
    from SAMSelfPromptLib.weights.targets import target_spec

    root = shared_path("acdc")
    spec = target_spec("cardiac-mr")
    (sparse,) = volume_cases(spec, root, ["patient013_frame01"], slice_step=4)
    (denser,) = volume_cases(spec, root, ["patient013_frame01"], slice_step=4, negative_step=1)
    (every,) = volume_cases(spec, root, ["patient013_frame01"])

    def ids(case):
        return {s.case_id for s in case}

    added = ids(denser) - ids(sparse)
    assert ids(sparse) < ids(denser) <= ids(every)
    assert added and all(not s.has_label for s in denser if s.case_id in added)
    # every slice without a structure is there, and the positives are still every 4th
    assert {s.case_id for s in every if not s.has_label} <= ids(denser)
    assert {s.case_id for s in denser if s.has_label} == {s.case_id for s in sparse if s.has_label}


def test_structure_embeddings_round_trip_and_select_the_structure(lite_model, tmp_path):
    import copy

    from SAMSelfPromptLib.weights.checkpoint import load_samsp, save_samsp

    model = copy.deepcopy(lite_model)
    model.set_structures(3)
    with torch.no_grad():
        model.structure_embed.copy_(torch.randn(3, 256, generator=torch.Generator().manual_seed(0)))
    path = save_samsp(tmp_path / "multi.pt", model, {"role": "auto"})
    loaded, _ = load_samsp(path)
    assert loaded.n_structures == 3
    assert torch.equal(loaded.structure_embed, model.structure_embed)
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [loaded.decode(emb, structure=torch.tensor([k]))[0] for k in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_negatives_teach_pass_one_to_paint_nothing(lite_model, tmp_path):
    """Presence training: on images without the structure the shipped PH2 model first paints
    something; a few steps with negatives (absence loss) and it leaves them empty."""
    import copy

    from SAMSelfPromptLib.core.preprocess import Intensity
    from SAMSelfPromptLib.training.data import array_samples
    from SAMSelfPromptLib.training.embedding_cache import DiskEmbeddingCache, cache_key
    from SAMSelfPromptLib.training.trainer import TrainConfig, evaluate_val, train
    from SAMSelfPromptLib.weights.catalogue import default_checkpoint
    from SAMSelfPromptLib.weights.checkpoint import load_samsp

    model, _ = load_samsp(default_checkpoint(None, True))
    images = [np.full((32, 32, 3), v, np.uint8) for v in (10, 60, 110, 160)]
    samples = array_samples(images, [np.zeros((32, 32), bool)] * 4, Intensity("RGB"))
    cache = DiskEmbeddingCache(tmp_path)
    g = torch.Generator().manual_seed(3)
    for s in samples:  # embeddings the PH2 model answers with a mask: strong positive-looking patterns
        cache.store(cache_key(s, model), torch.randn(256, 64, 64, generator=g))
    emb, frames = cache.embed(model, samples)
    before = evaluate_val(model, samples, emb, frames)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-3, warmup_steps=1, val_from=1)
    res = train(copy.deepcopy(model), samples, samples, cfg, cache=cache, progress=False, log=lambda _: None)
    after = res.best_val
    assert after["n_negative"] == 4
    assert after["fp_rate"] == 0.0 and after["score"] == 1.0
    assert before["fp_rate"] > 0.0 or before["score"] < 1.0 or after["score"] >= before["score"]
    assert "absence" in res.history[0] and "presence" in res.history[0]


def test_a_noncommercial_target_says_so_where_the_model_is_described(tmp_path):
    """ACDC's terms travel with the target: the Slicer module's and the web app's description, and
    the controller's target menu, show them (the text comes from Target.describe)."""
    from SAMSelfPromptLib.weights.catalogue import Target
    from SAMSelfPromptLib.weights.targets import target_spec

    spec = target_spec("cardiac-mr")
    target = Target.from_summary("samsp_acdc_litemedsam", tmp_path / "samsp_acdc_litemedsam.pt",
                                 {"target": spec.to_dict(), "val_metrics": {"samsp": 0.8}})
    text = target.describe()
    assert "NON-COMMERCIAL USE ONLY" in text and "CC BY-NC-SA" in text
    assert "Right ventricle, Myocardium, Left ventricle" in text and "val Dice 0.800" in text
    assert target.noncommercial and target.fits("MR") and not target.fits("CT")


def test_promise_is_a_method_in_the_same_target_list():
    """ProMISe (issue 15) is offered beside SAM-SP for the inputs its target fits, never as the default."""
    from SAMSelfPromptLib.weights.catalogue import choose_model, open_model, targets_for

    names = [t.name for t in targets_for("RGB")]
    assert names[0] == "dermoscopy-lesion" and "dermoscopy-lesion-promise" in names
    choice = choose_model(modality=None, is_rgb=True, target="dermoscopy-lesion-promise")
    opened = open_model(choice, "cpu")
    assert opened.segmenter.metadata["method"] == "promise" and opened.segmenter.refiner is None
    assert "ProMISe" in opened.description and opened.structures[0].name == "Skin lesion"


def test_the_busi_target_encodes_with_its_trained_top_stages(lite_model):
    """breast-lesion-us ships TinyViT stages 2-3 and the neck trained with its decoder: the catalogue's Segmenter
    must encode with them (its folded copy is built from the loaded weights), not with LiteMedSAM's."""
    from SAMSelfPromptLib.weights.catalogue import open_segmenter

    seg = open_segmenter(device="cpu", modality="US", target="breast-lesion-us").segmenter
    assert seg.metadata["encoder_tuned_from"] == 2
    for key in ("image_encoder.neck.0.weight", "image_encoder.layers.2.blocks.0.attn.qkv.weight"):
        assert not torch.equal(seg.model.state_dict()[key], lite_model.state_dict()[key]), key
    frozen = "image_encoder.layers.1.blocks.0.attn.qkv.weight"  # stages before 2 stay LiteMedSAM's
    assert torch.equal(seg.model.state_dict()[frozen], lite_model.state_dict()[frozen])
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = seg._folded_encoder()(x, seg.precision)
        module, vanilla = seg.model.encode(x), lite_model.encode(x)
    assert (fast - module).norm() < 0.05 * module.norm()  # the shipped weights, at the fast path's precision
    assert (fast - vanilla).norm() > 0.2 * vanilla.norm()


def test_every_shipped_summary_describes_the_checkpoint_beside_it():
    """The hosts' model menus and `models` read the summary JSON, not the checkpoint: a checkpoint replaced without
    its summary would show another model's val metrics and presence threshold."""
    import json

    from SAMSelfPromptLib.io.files import sha256_of
    from SAMSelfPromptLib.training.api import SUMMARY_METADATA_KEYS, _plain
    from SAMSelfPromptLib.weights.catalogue import WEIGHTS_DIR
    from SAMSelfPromptLib.weights.checkpoint import read_samsp

    summaries = sorted(WEIGHTS_DIR.glob("*.json"))
    assert len(summaries) >= 7
    for path in summaries:
        summary = json.loads(path.read_text())
        checkpoint = path.with_suffix(".pt")
        assert summary["sha256"] == sha256_of(checkpoint), f"{path.name} describes another {checkpoint.name}"
        meta = read_samsp(checkpoint)["metadata"]
        # modality and target: the summary gives the target's kind and spec, which older checkpoints do not carry
        for key in set(SUMMARY_METADATA_KEYS) - {"modality", "target"}:
            assert json.dumps(summary.get(key), sort_keys=True) == json.dumps(_plain(meta.get(key)), sort_keys=True), \
                f"{path.name}: {key} differs from {checkpoint.name}'s metadata"
