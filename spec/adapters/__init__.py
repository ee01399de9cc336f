"""Ready-made adapters for real libraries' attention (each declares its kind, so ``KIND=`` may be left out):

    attnspec check attnspec.adapters.torch:MultiheadAttention attnspec.adapters.torch:SDPA attnspec.adapters.torch:SDPAMHA \
                   attnspec.adapters.torch:TransformerEncoderLayer
    attnspec check attnspec.adapters.transformers:GPT2Attention attnspec.adapters.transformers:GPT2Block

``attnspec.adapters.torch`` needs only torch; ``attnspec.adapters.transformers`` needs Hugging Face
transformers (``pip install 'attnspec[transformers]'``). Helpers for writing adapters are in ``attnspec.adapters.base``.
"""
