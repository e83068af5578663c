"""The training batch contract between the data pipeline and the losses.

A batch is a dict of arrays: `input_ids` `[B, L]` (Hugging Face image-token convention, block-aligned EOS
padding applied, spec §4.5), `labels` `[B, L]` (not shifted; `IGNORE` = unsupervised), `attention_mask`
`[B, L]`, and optionally `pixel_values` `[N, patch_dim]` with `vision` (a `VisionLayout`). Both sides import
this module, so neither imports the other.
"""

IGNORE = -100  # the label of a position that is not supervised (PyTorch's cross-entropy ignore_index)
