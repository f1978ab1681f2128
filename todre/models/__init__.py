"""Model families: one module per family (`todre.models.llava`, `todre.models.qwen2_5_vl`, ...) behind the adapter protocol of `todre.models.base`."""
