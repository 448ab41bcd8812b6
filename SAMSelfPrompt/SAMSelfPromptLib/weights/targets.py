"""Targets: what a shipped prompt-free model segments, for which inputs, and under which terms.

A target is a SAM-SP checkpoint plus what a clinician and Slicer need to know about it:

- the input kinds it was trained for ("RGB" dermoscopy pictures, "US" grey ultrasound pictures,
  "CT", "MR") and the intensity handling (recorded in the checkpoint's metadata);
- its structures, each with a segment name, a colour and Slicer's DICOM terminology (SNOMED CT
  category, type and, where one fits, anatomic region);
- the training data, its terms (ACDC is non-commercial) and the training recipe;
- validation metrics (in the checkpoint's JSON summary beside it).

The static part lives here (it is what ``samselfprompt train --target NAME`` trains); the measured
part lives in the checkpoint's metadata, so a user's adapted model (metadata "target") is a
target like any shipped one.

How the input's kind is decided (``input_kind``), in order:
1. the DICOM Modality when the input has one (a colour picture is "RGB" whatever it says);
2. a colour picture is "RGB";
3. values below -500 occur only in CT (air is -1000 HU): "CT";
4. a single grey 2D picture (no modality): "US";
5. any other grey volume without a modality: "MR".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCT = "SCT"
ANATOMICAL_STRUCTURE = (SCT, "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = (SCT, "49755003", "Morphologically Altered Structure")
TERMS_NONCOMMERCIAL = "non-commercial"


@dataclass(frozen=True)
class Structure:
    """One output segment: its name, colour (0..1 RGB) and DICOM/Slicer terminology codes."""

    name: str
    color: tuple[float, float, float]
    category: tuple[str, str, str]  # (scheme, code, meaning)
    type: tuple[str, str, str]
    region: tuple[str, str, str] | None = None
    label_ids: tuple[int, ...] = (1,)  # the label value(s) in the training data

    def terminology_entry(self) -> str:
        """Slicer's segment terminology string (the "TerminologyEntry" segment tag)."""
        def code(c: tuple[str, str, str] | None) -> str:
            return "^".join(c) if c else "^^"

        region_context = "Anatomic codes - DICOM master list"
        return (f"Segmentation category and type - DICOM master list~{code(self.category)}~{code(self.type)}~^^"
                f"~{region_context}~{code(self.region)}~^^|")

    def segment_entry(self, label: int) -> dict[str, Any]:
        """The writers' segment description (io.writers / io.dicomseg): name, colour, terminology codes."""
        def coded(c: tuple[str, str, str]) -> list[str]:  # slicerio's form: [scheme, value, meaning]
            return list(c)

        terminology: dict[str, Any] = {"contextName": "Segmentation category and type - DICOM master list",
                                       "category": coded(self.category), "type": coded(self.type)}
        if self.region:
            terminology["anatomicContextName"] = "Anatomic codes - DICOM master list"
            terminology["anatomicRegion"] = coded(self.region)
        return {"label": label, "name": self.name, "color": self.color, "terminology": terminology,
                "codes": {"category": self.category, "type": self.type, "region": self.region}}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "color": list(self.color), "category": list(self.category),
                "type": list(self.type), "region": list(self.region) if self.region else None,
                "label_ids": list(self.label_ids), "terminology": self.terminology_entry()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Structure":
        return cls(str(d["name"]), tuple(d.get("color") or (1.0, 1.0, 0.0)),  # type: ignore[arg-type]
                   tuple(d.get("category") or ANATOMICAL_STRUCTURE),  # type: ignore[arg-type]
                   tuple(d.get("type") or (SCT, "", d["name"])),  # type: ignore[arg-type]
                   tuple(d["region"]) if d.get("region") else None,  # type: ignore[arg-type]
                   tuple(int(i) for i in d.get("label_ids", (1,))))


@dataclass(frozen=True)
class TargetSpec:
    """A shipped target's fixed description and its training recipe."""

    name: str
    title: str
    kinds: tuple[str, ...]
    structures: tuple[Structure, ...]
    checkpoint: str  # file name beside weights/catalogue.py
    dataset: str  # folder under shared/data it is trained from
    layout: str  # "2d" (images/ + masks/) or "3d" (images/ + labels/ volumes)
    terms: str
    citation: str
    noncommercial: bool = False
    default_for: tuple[str, ...] = ()  # input kinds it is the default for
    # Recipe: CPU mode on cached embeddings (see docs/RESULTS.md, Targets, for the measured runs).
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "kinds": list(self.kinds),
                "structures": [s.to_dict() for s in self.structures], "dataset": self.dataset,
                "terms": self.terms, "citation": self.citation, "noncommercial": self.noncommercial,
                "default_for": list(self.default_for), "recipe": dict(self.recipe)}


LESION = (SCT, "52988006", "Lesion")

TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec(
        "dermoscopy-lesion", "Skin lesion (dermoscopy)", ("RGB",),
        (Structure("Skin lesion", (0.85, 0.55, 0.25), ALTERED_STRUCTURE, LESION, (SCT, "39937001", "Skin")),),
        "samsp_ph2_litemedsam.pt", "ph2", "2d",
        "PH2: free for research and benchmarking with citation; not for redistribution",
        "Mendonca et al., PH2 - a dermoscopic image database for research and benchmarking, EMBC 2013",
        default_for=("RGB",), recipe={"epochs": 12}),
    TargetSpec(
        "breast-lesion-us", "Breast lesion (ultrasound)", ("US",),
        (Structure("Breast lesion", (0.9, 0.3, 0.3), ALTERED_STRUCTURE, LESION, (SCT, "76752008", "Breast")),),
        "samsp_busi_litemedsam.pt", "busi", "2d",
        "BUSI: released for research use with citation; not for redistribution",
        "Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28 (2020) 104863",
        recipe={"epochs": 6, "init": "samsp_ctliver_litemedsam.pt", "y0_weight": 1.0, "lr": 5e-4,
                "encoder_from_stage": 2, "encoder_lr": 5e-5}),
    TargetSpec(
        "fetal-head-us", "Fetal head (ultrasound)", ("US",),
        (Structure("Fetal head", (0.95, 0.8, 0.6), ANATOMICAL_STRUCTURE, (SCT, "69536005", "Head")),),
        "samsp_hc18_litemedsam.pt", "hc18", "2d",
        "HC18 (Zenodo 10.5281/zenodo.1322001): listed as CC BY 4.0, with citation",
        "van den Heuvel et al., Automated measurement of fetal head circumference using 2D ultrasound images, "
        "PLoS ONE 13(8) 2018", recipe={"epochs": 12, "max_train": 160, "max_val": 100}),
    TargetSpec(
        "left-atrium-mr", "Left atrium (LGE-MRI)", ("MR",),
        (Structure("Left atrium", (0.8, 0.35, 0.55), ANATOMICAL_STRUCTURE, (SCT, "82471001", "Left atrium")),),
        "samsp_la_litemedsam.pt", "la_mri", "3d",
        "LA 2018 challenge data: free for research with citation",
        "Xiong et al., A global benchmark of algorithms for segmenting the left atrium from LGE-MRI, "
        "Medical Image Analysis 67 (2021) 101832",
        recipe={"epochs": 10, "train_slice_step": 8, "train_negative_step": 2, "val_volumes": 2, "init": "samsp_ctliver_litemedsam.pt", "y0_weight": 1.0, "lr": 5e-4}),
    TargetSpec(
        "cardiac-mr", "Heart: RV, myocardium, LV (cine MRI, short axis)", ("MR",),
        (Structure("Right ventricle", (0.3, 0.55, 0.9), ANATOMICAL_STRUCTURE, (SCT, "53085002", "Right ventricle"),
                   label_ids=(1,)),
         Structure("Myocardium", (0.75, 0.45, 0.35), ANATOMICAL_STRUCTURE, (SCT, "74281007", "Myocardium"),
                   (SCT, "87878005", "Left ventricle"), label_ids=(2,)),
         Structure("Left ventricle", (0.9, 0.25, 0.3), ANATOMICAL_STRUCTURE, (SCT, "87878005", "Left ventricle"),
                   label_ids=(3,))),
        "samsp_acdc_litemedsam.pt", "acdc", "3d",
        "ACDC: CC BY-NC-SA 4.0, NON-COMMERCIAL use only; cite Bernard et al. 2018",
        "Bernard et al., Deep learning techniques for automatic MRI cardiac multi-structures segmentation and "
        "diagnosis: is the problem solved?, IEEE TMI 37(11) 2018", noncommercial=True,
        recipe={"epochs": 10, "train_slice_step": 2, "init": "samsp_ctliver_litemedsam.pt", "y0_weight": 1.0, "lr": 5e-4}),
    TargetSpec(
        "liver-ct", "Liver (CT)", ("CT",),
        (Structure("Liver", (0.87, 0.51, 0.4), ANATOMICAL_STRUCTURE, (SCT, "10200004", "Liver"), label_ids=(5,)),),
        "samsp_ctliver_litemedsam.pt", "ct_totalseg", "3d",
        "TotalSegmentator example data (presumed CC BY 4.0); silver-standard labels",
        "Wasserthal et al., TotalSegmentator, Radiology: AI 2023", default_for=("CT",),
        recipe={"epochs": 40, "image": "ct_small.nii.gz", "label": "labels_small.nii.gz"}),
)

# DICOM modalities of colour photographs (dermoscopy is XC or OT in practice).
PHOTO_MODALITIES = ("XC", "OT", "ES", "GM", "SM")


def target_spec(name: str) -> TargetSpec:
    for t in TARGETS:
        if t.name == name:
            return t
    from ..errors import InputError

    raise InputError(f"unknown target '{name}'; shipped targets: {', '.join(t.name for t in TARGETS)}")


def input_kind(modality: str | None, is_rgb: bool, array: np.ndarray | None = None) -> str:
    """The catalogue's key for an input (the rule in this module's docstring)."""
    if is_rgb:
        return "RGB"
    mod = (modality or "").upper()
    if mod and mod not in PHOTO_MODALITIES and mod != "RGB":
        return "MR" if mod == "MRI" else mod
    if array is None:
        return "CT"  # nothing else known: the historic default
    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
    if finite.size and float(finite.min()) < -500:  # NaN or inf voxels do not decide the kind
        return "CT"
    if array.ndim == 2 or (array.ndim == 3 and array.shape[0] == 1):
        return "US"
    return "MR"
