"""The GPU check's peer: PyTorch + diffusers doing the same work as `loragate bench` on the same
random weights, and the maker of those weights.

    gpu_peer.py make OUT_DIR CLIP_BPE_GZ     # random SD 1.5 and SDXL pipelines in diffusers layout, fp16
    gpu_peer.py txt2img MODEL_DIR --size 512 --steps 25 --guidance 7.5 --batches 1,8 --repeat 3
    gpu_peer.py unet MODEL_DIR --size 1024 --batch 2 --calls 10

Each prints one JSON object. The architectures are the published configs of SD 1.5 and SDXL base
1.0; weights come from each module's default initialisation with a fixed seed, so both tools
measure the same numbers of the same shapes. Speed does not depend on the values.
"""
import argparse
import gzip
import json
import os
import statistics
import time

import torch

SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, sample_size=64,
)
SDXL_UNET = dict(
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, sample_size=128,
)
VAE = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(bpe_gz, out):
    """OpenAI CLIP's vocabulary as vocab.json + merges.txt (the construction of CLIP's own code)."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(out, "vocab.json"), "w"))
    open(os.path.join(out, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, open(os.path.join(out, "tokenizer_config.json"), "w"))


def make(out, bpe_gz, which=("sd15", "sdxl")):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def save(module, path):
        module.to(torch.float16).save_pretrained(path, safe_serialization=True)

    for name, unet_cfg, sdxl in (("sd15", SD15_UNET, False), ("sdxl", SDXL_UNET, True)):
        if name not in which:
            continue
        root = os.path.join(out, name)
        torch.manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(dev):
            save(UNet2DConditionModel(**unet_cfg), os.path.join(root, "unet"))
            save(AutoencoderKL(**VAE, scaling_factor=0.13025 if sdxl else 0.18215), os.path.join(root, "vae"))
            save(CLIPTextModel(CLIPTextConfig(**CLIP_L)), os.path.join(root, "text_encoder"))
            if sdxl:
                save(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)), os.path.join(root, "text_encoder_2"))
        DDIMScheduler(**SCHEDULER).save_pretrained(os.path.join(root, "scheduler"))
        write_tokenizer(bpe_gz, os.path.join(root, "tokenizer"))
        if sdxl:
            write_tokenizer(bpe_gz, os.path.join(root, "tokenizer_2"))
        index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "DDIMScheduler"]}
        if sdxl:
            index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=True)
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        json.dump(index, open(os.path.join(root, "model_index.json"), "w"), indent=1)
    print(json.dumps({"made": [os.path.join(out, n) for n in which], "torch": torch.__version__}))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def txt2img(a):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float16 if dev == "cuda" else torch.float32,
                                                   safety_checker=None, requires_safety_checker=False).to(dev)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - t
    out = []
    for b in a.batches:
        def run():
            s = time.perf_counter()
            pipe(["a photograph of an astronaut riding a horse"] * b, height=a.size, width=a.size,
                 num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="pt")
            sync()
            return time.perf_counter() - s
        run()
        secs = statistics.median([run() for _ in range(a.repeat)])
        out.append(dict(batch=b, seconds=secs, seconds_per_image=secs / b, images_per_second=b / secs))
    import diffusers
    print(json.dumps(dict(model=a.model, torch=torch.__version__, diffusers=diffusers.__version__, device=dev,
                          size=a.size, steps=a.steps, guidance=a.guidance, load_s=load_s, batches=out)))


def unet(a):
    from diffusers import UNet2DConditionModel
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    t = time.perf_counter()
    model = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=dtype).to(dev).eval()
    sync()
    load_s = time.perf_counter() - t
    rows = 2 * a.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, 4, a.size // 8, a.size // 8, generator=g).to(dev, dtype)
    ctx = torch.randn(rows, 77, model.config.cross_attention_dim, generator=g).to(dev, dtype)
    ts = torch.full((rows,), 500, device=dev)
    added = None
    if model.config.addition_embed_type == "text_time":
        pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
        added = dict(text_embeds=torch.randn(rows, pooled, generator=g).to(dev, dtype),
                     time_ids=torch.tensor([[a.size, a.size, 0, 0, a.size, a.size]] * rows, device=dev, dtype=dtype))
    with torch.no_grad():
        def call():
            s = time.perf_counter()
            model(x, ts, encoder_hidden_states=ctx, added_cond_kwargs=added)
            sync()
            return (time.perf_counter() - s) * 1000
        call()
        ms = statistics.median([call() for _ in range(a.calls)])
    print(json.dumps(dict(model=a.model, torch=torch.__version__, device=dev, size=a.size, batch=a.batch, rows=rows,
                          load_s=load_s, ms_per_call=ms)))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("bpe_gz")
    m.add_argument("--which", default="sd15,sdxl")
    t = sub.add_parser("txt2img")
    t.add_argument("model")
    t.add_argument("--size", type=int, default=512)
    t.add_argument("--steps", type=int, default=25)
    t.add_argument("--guidance", type=float, default=7.5)
    t.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    t.add_argument("--repeat", type=int, default=3)
    u = sub.add_parser("unet")
    u.add_argument("model")
    u.add_argument("--size", type=int, default=1024)
    u.add_argument("--batch", type=int, default=2)
    u.add_argument("--calls", type=int, default=10)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    {"make": lambda: make(a.out, a.bpe_gz, a.which.split(",")), "txt2img": lambda: txt2img(a), "unet": lambda: unet(a)}[a.what]()


if __name__ == "__main__":
    main()
