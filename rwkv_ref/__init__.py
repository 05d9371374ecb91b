"""rwkv_ref: a readable, tested reference implementation of RWKV-4 (arXiv 2305.13048)."""
from rwkv_ref.convert import from_blinkdl, from_hf, save_blinkdl, to_hf
from rwkv_ref.model import RWKV, RWKVConfig
from rwkv_ref.state import LayerState, RWKVState
from rwkv_ref.tokenizer import CharTokenizer, NeoXTokenizer
from rwkv_ref.wkv import WKV_IMPLS, WKVState, wkv, wkv_step

__version__ = "0.1.0"
__all__ = ["WKV_IMPLS", "WKVState", "wkv", "wkv_step", "RWKV", "RWKVConfig", "LayerState",
           "RWKVState", "CharTokenizer", "NeoXTokenizer", "from_blinkdl", "from_hf",
           "save_blinkdl", "to_hf"]
