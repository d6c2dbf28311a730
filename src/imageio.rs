//! Images in and out: tensors ↔ 8-bit RGB, and PNG files that carry their generation
//! parameters in text chunks (A1111's `parameters` chunk, readable by the tools people use,
//! plus a `loragate` chunk with the same facts as JSON).

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// `[B, 3, H, W]` (or `[3, H, W]`) floats in `[0, 1]` to 8-bit images (round to nearest).
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let t = if t.rank() == 3 { t.unsqueeze(0)? } else { t.clone() };
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("expected 3 colour channels, got {c}")));
    }
    let data = (t.to_dtype(DType::F32)?.clamp(0f32, 1f32)? * 255.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            let bytes: Vec<u8> = data[i * per..(i + 1) * per].iter().map(|v| *v as u8).collect();
            RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer size matches")
        })
        .collect())
}

/// 8-bit images (all the same size) to `[B, 3, H, W]` floats in `[0, 1]`.
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = images.first().ok_or_else(|| Error::invalid("no images"))?;
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for img in images {
        if img.dimensions() != (w, h) {
            return Err(Error::invalid(format!(
                "images of different sizes: {}x{} and {}x{}",
                w,
                h,
                img.width(),
                img.height()
            )));
        }
        data.extend(img.as_raw().iter().map(|&v| v as f32 / 255.0));
    }
    let t = Tensor::from_vec(data, (images.len(), h as usize, w as usize, 3), &Device::Cpu)?;
    Ok(t.permute((0, 3, 1, 2))?.contiguous()?.to_device(device)?)
}

/// Encodes a PNG with UTF-8 text chunks (`iTXt`), so prompts in any script survive.
pub fn encode_png(img: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    encode_png_with(img, text, png::Compression::Balanced)
}

/// Encodes a PNG for a report that is rewritten on every run: fast compression (a fifth of the
/// time of `Balanced` for slightly larger files).
pub fn encode_png_fast(img: &RgbImage) -> Result<Vec<u8>> {
    encode_png_with(img, &[], png::Compression::Fast)
}

fn encode_png_with(img: &RgbImage, text: &[(String, String)], compression: png::Compression) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(Cursor::new(&mut out), img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(compression);
        for (k, v) in text {
            enc.add_itxt_chunk(k.clone(), v.clone()).map_err(|e| Error::invalid(format!("PNG text chunk `{k}`: {e}")))?;
        }
        let mut writer = enc.write_header().map_err(|e| Error::invalid(format!("PNG header: {e}")))?;
        writer.write_image_data(img.as_raw()).map_err(|e| Error::invalid(format!("PNG data: {e}")))?;
        writer.finish().map_err(|e| Error::invalid(format!("PNG: {e}")))?;
    }
    Ok(out)
}

/// Writes a PNG atomically.
pub fn write_png(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    write_atomic(path, &encode_png(img, text)?)
}

/// Reads any image the `image` crate decodes (PNG, JPEG, WebP) as 8-bit RGB.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| Error::invalid(format!("{}: not a readable image: {e}", path.display())))?;
    Ok(img.to_rgb8())
}

/// The text chunks of a PNG file (tEXt, zTXt and iTXt).
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| Error::invalid(format!("{}: not a PNG: {e}", path.display())))?;
    let info = reader.info();
    let mut out = Vec::new();
    for t in &info.uncompressed_latin1_text {
        out.push((t.keyword.clone(), t.text.clone()));
    }
    for t in &info.compressed_latin1_text {
        if let Ok(v) = t.get_text() {
            out.push((t.keyword.clone(), v));
        }
    }
    for t in &info.utf8_text {
        if let Ok(v) = t.get_text() {
            out.push((t.keyword.clone(), v));
        }
    }
    Ok(out)
}

/// Lays images out in a grid (row-major), for contact sheets and reports.
pub fn grid(images: &[RgbImage], columns: usize) -> Option<RgbImage> {
    let first = images.first()?;
    let (w, h) = first.dimensions();
    let columns = columns.max(1).min(images.len());
    let rows = images.len().div_ceil(columns);
    let mut out = RgbImage::from_pixel(w * columns as u32, h * rows as u32, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % columns) as u32 * w, (i / columns) as u32 * h);
        image::imageops::overlay(&mut out, img, x as i64, y as i64);
    }
    Some(out)
}
