"""Resumable outputs of archive runs (`predict`, `embed` over 10^5..10^7 images): files written as results
are made, so that a run killed at image 900,000 resumes there. Plain Python and numpy (pyarrow for parquet);
local paths only for now."""

from bioclip_jax.outputs.embeddings import EmbeddingShards, merge_embedding_parts
from bioclip_jax.outputs.rows import RowsOutput, merge_parts
from bioclip_jax.outputs.run_record import OutputSummary

__all__ = ["EmbeddingShards", "OutputSummary", "RowsOutput", "merge_embedding_parts", "merge_parts"]
