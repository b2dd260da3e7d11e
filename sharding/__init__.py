"""Meshes and logical-axis rules for minicpmv-jax (data / fsdp / tensor).

Every parameter declares logical axis names where it is created (see :mod:`minicpmv_jax.layers`);
this package is the only place that maps them to mesh axes. :data:`LOGICAL_AXES` lists the names the
model uses today; the rules that place them on a mesh arrive with the sharding work.
"""

#: Logical axis names carried by the parameters of the three towers.
LOGICAL_AXES = (
    # language model
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
    # vision encoder
    "vision_patch", "vision_pos", "vision_embed", "vision_heads", "vision_head_dim", "vision_mlp",
    # resampler
    "resampler_queries", "resampler_heads", "resampler_proj",
)
