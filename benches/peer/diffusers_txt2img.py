"""The peer: the same txt2img work as loragate's benchmark, with PyTorch + diffusers modules.

tiny-sd from assets/tinyworld, 128x128, 20 DDIM steps, guidance 5, fp32 on the CPU, model
loading excluded; prints the median of 5 runs per batch size as JSON.
usage: diffusers_txt2img.py ASSETS_TINYWORLD
"""
import json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler

torch.set_grad_enabled(False)
sd = os.path.join(sys.argv[1], "tiny-sd")
ids = tiny_sd.tokenizer(sd)
te = tiny_sd.text_encoder(sd)
unet = UNet2DConditionModel.from_pretrained(os.path.join(sd, "unet"), torch_dtype=torch.float32).eval()
vae = AutoencoderKL.from_pretrained(os.path.join(sd, "vae"), torch_dtype=torch.float32).eval()
sched_cfg = json.load(open(os.path.join(sd, "scheduler", "scheduler_config.json")))

def txt2img(prompts, latents):
    sch = DDIMScheduler(**{k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    sch.set_timesteps(20)
    cond = te(ids(prompts)).last_hidden_state
    unc = te(ids([""] * len(prompts))).last_hidden_state
    x = latents
    for t in sch.timesteps:
        e = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([unc, cond])).sample
        eu, ec = e.chunk(2)
        x = sch.step(eu + 5.0 * (ec - eu), t, x).prev_sample
    return ((vae.decode(x / 0.18215).sample + 1) / 2).clamp(0, 1)

prompts = ["red circle, large, in the center, white background", "blue square, small, on the left, sunset background",
           "yellow triangle, large, at the bottom, night background", "purple diamond, on the right, grass background"]
g = torch.Generator().manual_seed(0)
res = {"torch": torch.__version__, "threads": torch.get_num_threads()}
for b in (1, 4, 8):
    lat = torch.randn(b, 4, 16, 16, generator=g)
    batch = [prompts[i % len(prompts)] for i in range(b)]
    txt2img(batch, lat)
    times = []
    for _ in range(5):
        t0 = time.perf_counter(); txt2img(batch, lat); times.append(time.perf_counter() - t0)
    res[f"batch{b}_s"] = sorted(times)[2]
print(json.dumps(res))
