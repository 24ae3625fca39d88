"""``jigsawdata experiment``: the paper's comparisons end to end, an application of the
builder and the trainers (settings and presets, the grid, its report)."""
