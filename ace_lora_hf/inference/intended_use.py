"""What the model is for and not for, its known limitations, and how to read calibrated scores and operating points:
one text, shown by the demo page and the model card (Markdown)."""


INTENDED_USE = """\
**For research** on medical vision-language models: zero-shot classification, retrieval and evaluation of chest
X-rays (and histopathology images), and adaptation with LoRA. **Not a medical device**: not cleared or approved for
clinical use, and not for diagnosis, triage or treatment decisions.

**Zero-shot scores are not diagnoses.** A score is a softmax over the labels that were typed: it says which of those
labels the image is closest to in the model's embedding space, not whether a finding is present, and it changes when
the labels or the prompt templates change.

**Known limitations.** The released weights were adapted on MIMIC-CXR (adult chest X-rays of one US hospital system),
and a model trained with ace-lora-hf reflects its own training data; other populations, hospitals, scanners,
portable (AP) films, children and other modalities may score differently, and subgroups can differ (measure it:
`ace-lora-evaluate --subgroup-columns sex,age_group,view`). Images are seen at 224 x 224 pixels, so small findings
can be missed. The paper's benchmarks measure AUC and accuracy, not calibration.

**Calibrated scores and operating points.** A calibration file (`ace-lora-evaluate --calibrate-on VAL.csv`) divides
the zero-shot logits by one temperature fitted on a labelled validation table: among images scored about 0.8, about
80% had the label *on data like that table*; recalibrate for another site, scanner or population. An operating point
is the threshold found on the validation table for a target sensitivity or specificity; the sensitivity,
specificity, PPV and NPV reported on the test table (with 95% intervals) are what to expect where the test table
resembles your data, and PPV and NPV also depend on how common the finding is. A calibration holds only for the
labels and templates it was fitted with, which is why other ones are refused.
"""


__all__ = ["INTENDED_USE"]
