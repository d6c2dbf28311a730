"""The peer for training speed: LoRA training steps with diffusers + PEFT on tiny-sd, in the
setting of loragate's `examples/train_speed.rs`: rank 8, alpha 8, targets to_q/to_k/to_v/to_out.0,
batch 4, 128 px (16x16 latents), fp32 on the CPU, AdamW, text encoded every step (frozen), VAE
latents cached. Prints the steps per second of STEPS timed steps after 3 warm-up steps as JSON.
usage: peft_train_step.py ASSETS_TINYWORLD [STEPS]
"""
import json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_sd  # noqa: E402
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, DDPMScheduler
from peft import LoraConfig

sd = os.path.join(sys.argv[1], "tiny-sd")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
ids = tiny_sd.tokenizer(sd)
te = tiny_sd.text_encoder(sd)
unet = UNet2DConditionModel.from_pretrained(os.path.join(sd, "unet"), torch_dtype=torch.float32)
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
g = torch.Generator().manual_seed(0)
latents = torch.randn(16, 4, 16, 16, generator=g)
captions = ["zorb, large, in the center, sky background", "zorb, small, on the left", "at the top, zorb, night background",
            "zorb, grass background, on the right", "small, zorb, at the bottom, white background"]
unet.train()


def step():
    idx = torch.randint(0, 16, (4,), generator=g)
    with torch.no_grad():
        ctx = te(ids([captions[i % len(captions)] for i in idx.tolist()])).last_hidden_state
    x0 = latents[idx]
    n = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    loss = F.mse_loss(unet(sched.add_noise(x0, n, t), t, encoder_hidden_states=ctx).sample, n)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for _ in range(3):
    step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
secs = time.perf_counter() - t0
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "steps_per_s": steps / secs}))
