"""Vision tokenizers. Each one is an nn.Module with a dataclass `config` (in_channels, image_size,
codebook_size, ...) and this protocol, which the sequence builder and the generate scripts rely on:

    code_shape -> tuple           shape of one image's codes, e.g. (7, 7) for a VQ grid, (32,) for SEED
    num_tokens -> int             prod(code_shape)
    encode(images [B, C, H, W] in [-1, 1]) -> codes [B, *code_shape] (long, in [0, codebook_size))
    decode(codes [B, *code_shape]) -> images [B, C, H, W] in [-1, 1]

vision_tokenizers.registry saves/loads any of them by kind (weights + config in one safetensors file).
"""
