"""Shared by the peers: tiny-sd's tokenizer (padded to 77 like loragate's) and text encoder,
loaded from the diffusers folder with transformers."""
import os
import torch
import safetensors.torch as st
from tokenizers import Tokenizer
from transformers import CLIPTextConfig, CLIPTextModel


def tokenizer(sd):
    """A function from a list of prompts to (N, 77) token ids padded with <|endoftext|>."""
    tok = Tokenizer.from_file(os.path.join(sd, "tokenizer", "tokenizer.json"))
    pad = tok.token_to_id("<|endoftext|>")

    def ids(texts):
        out = torch.full((len(texts), 77), pad, dtype=torch.long)
        for i, t in enumerate(texts):
            e = tok.encode(t).ids[:77]
            out[i, :len(e)] = torch.tensor(e)
        return out
    return ids


def text_encoder(sd):
    """The frozen CLIP text encoder in fp32 (keys with or without the `text_model.` prefix)."""
    te = CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(sd, "text_encoder", "config.json")))
    weights = st.load_file(os.path.join(sd, "text_encoder", "model.safetensors"))
    inner = te.text_model if hasattr(te, "text_model") else te
    inner.load_state_dict({k.removeprefix("text_model."): v.float() for k, v in weights.items()})
    return te.eval().requires_grad_(False)
