//! The original (LDM/SGM) module names of Stable Diffusion checkpoints, mapped to diffusers'.
//!
//! A1111/ComfyUI single-file checkpoints and SDXL kohya LoRAs name UNet modules the way the
//! original repositories did (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`). This module
//! maps a diffusers UNet module path to that name, given the UNet's layout; the inverse map is
//! built by enumerating the model's own modules, so it can never disagree with the model.

use crate::model::unet::UNetConfig;

/// The LDM name of a diffusers UNet module path (`down_blocks.1.attentions.0.proj_in` →
/// `input_blocks.4.1.proj_in`), or `None` when the path is not a UNet module this knows.
pub fn unet_module_to_ldm(path: &str, config: &UNetConfig) -> Option<String> {
    let n = config.block_out_channels.len();
    let layers = config.layers_per_block.expand(n, "layers_per_block").ok()?;
    let parts: Vec<&str> = path.split('.').collect();
    let rest = |i: usize| parts[i..].join(".");
    let map_resnet = |tail: &str| -> Option<String> {
        let (head, after) = tail.split_once('.').map(|(h, a)| (h, Some(a))).unwrap_or((tail, None));
        let mapped = match head {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            _ => return None,
        };
        Some(match after {
            Some(a) => format!("{mapped}.{a}"),
            None => mapped.to_string(),
        })
    };
    match parts.first().copied()? {
        "conv_in" => Some(format!("input_blocks.0.0{}", suffix(&parts, 1))),
        "conv_norm_out" => Some(format!("out.0{}", suffix(&parts, 1))),
        "conv_out" => Some(format!("out.2{}", suffix(&parts, 1))),
        "time_embedding" => {
            let l = match *parts.get(1)? {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            Some(format!("time_embed.{l}{}", suffix(&parts, 2)))
        }
        "add_embedding" => {
            let l = match *parts.get(1)? {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            Some(format!("label_emb.0.{l}{}", suffix(&parts, 2)))
        }
        "down_blocks" => {
            let d: usize = parts.get(1)?.parse().ok()?;
            let base: usize = 1 + layers[..d].iter().map(|l| l + 1).sum::<usize>();
            match *parts.get(2)? {
                "resnets" => {
                    let l: usize = parts.get(3)?.parse().ok()?;
                    Some(format!("input_blocks.{}.0.{}", base + l, map_resnet(&rest(4))?))
                }
                "attentions" => {
                    let l: usize = parts.get(3)?.parse().ok()?;
                    Some(format!("input_blocks.{}.1.{}", base + l, rest(4)))
                }
                "downsamplers" if parts.get(4) == Some(&"conv") => {
                    Some(format!("input_blocks.{}.0.op{}", base + layers[d], suffix(&parts, 5)))
                }
                _ => None,
            }
        }
        "mid_block" => match (*parts.get(1)?, *parts.get(2)?) {
            ("resnets", "0") => Some(format!("middle_block.0.{}", map_resnet(&rest(3))?)),
            ("attentions", "0") => Some(format!("middle_block.1.{}", rest(3))),
            ("resnets", "1") => Some(format!("middle_block.2.{}", map_resnet(&rest(3))?)),
            _ => None,
        },
        "up_blocks" => {
            let u: usize = parts.get(1)?.parse().ok()?;
            let rev: Vec<usize> = layers.iter().rev().map(|l| l + 1).collect();
            let base: usize = rev[..u].iter().sum();
            let has_attention = config.up_block_types.get(u)? == "CrossAttnUpBlock2D";
            match *parts.get(2)? {
                "resnets" => {
                    let l: usize = parts.get(3)?.parse().ok()?;
                    Some(format!("output_blocks.{}.0.{}", base + l, map_resnet(&rest(4))?))
                }
                "attentions" => {
                    let l: usize = parts.get(3)?.parse().ok()?;
                    Some(format!("output_blocks.{}.1.{}", base + l, rest(4)))
                }
                "upsamplers" if parts.get(4) == Some(&"conv") => {
                    let slot = if has_attention { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{slot}.conv{}", base + rev[u] - 1, suffix(&parts, 5)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn suffix(parts: &[&str], from: usize) -> String {
    if parts.len() > from { format!(".{}", parts[from..].join(".")) } else { String::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_names_match_the_original_checkpoint_layout() {
        let c = UNetConfig::sd15();
        let cases = [
            ("conv_in", "input_blocks.0.0"),
            ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "input_blocks.2.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.1.resnets.0.conv1", "input_blocks.4.0.in_layers.2"),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
            ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
            ("mid_block.resnets.1.norm2", "middle_block.2.out_layers.0"),
            ("up_blocks.0.resnets.2.conv_shortcut", "output_blocks.2.0.skip_connection"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
            ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
            ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.11.1.transformer_blocks.0.ff.net.2"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("conv_out", "out.2"),
        ];
        for (d, l) in cases {
            assert_eq!(unet_module_to_ldm(d, &c).as_deref(), Some(l), "{d}");
        }
    }

    #[test]
    fn sdxl_names_match_the_sgm_layout() {
        let c = UNetConfig::sdxl();
        let cases = [
            ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "input_blocks.4.1.transformer_blocks.1.attn2.to_k"),
            ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
            ("up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0", "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
            ("add_embedding.linear_1", "label_emb.0.0"),
        ];
        for (d, l) in cases {
            assert_eq!(unet_module_to_ldm(d, &c).as_deref(), Some(l), "{d}");
        }
    }
}
