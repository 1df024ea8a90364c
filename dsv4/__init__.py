"""dsv4: a DeepSeek-V4 inference engine."""
