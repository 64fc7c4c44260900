//! The per-image preprocessing: channel conversion, resize / centre crop, scaling and
//! normalisation, written straight into the model's layout.

use std::fmt;
use std::str::FromStr;

use super::resample;
use crate::{Error, Result};

/// Memory layout of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// N x C x H x W (PyTorch exports).
    Nchw,
    /// N x H x W x C (TensorFlow / Keras exports).
    Nhwc,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
        })
    }
}

impl FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            _ => Err(Error::Usage(format!(
                "unknown layout '{s}': expected nchw or nhwc"
            ))),
        }
    }
}

/// Channel order of a 3-channel model input. Grey images are 1 channel; RGB images
/// fed to a 1-channel model are converted to grey (ITU-R 601 luma, as PIL's
/// `convert("L")`), grey images fed to a multi-channel model are replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    /// OpenCV order: model channel 0 is blue.
    Bgr,
}

impl fmt::Display for ChannelOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelOrder::Rgb => "RGB",
            ChannelOrder::Bgr => "BGR",
        })
    }
}

impl FromStr for ChannelOrder {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rgb" => Ok(ChannelOrder::Rgb),
            "bgr" => Ok(ChannelOrder::Bgr),
            _ => Err(Error::Usage(format!(
                "unknown channel order '{s}': expected rgb or bgr"
            ))),
        }
    }
}

/// How an image gets to the model's height and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The image must already have the model's size; otherwise an error names the file.
    None,
    /// Bilinear (PIL's, antialiased when downscaling) straight to H x W.
    Exact,
    /// torchvision's `Resize(S)` then `CenterCrop((H, W))`: the short side becomes S
    /// (the long side `int(S * long / short)`), bilinear, then the centre H x W
    /// (offsets `round((size - crop) / 2)`, half to even as Python's `round`; zero
    /// padding where the crop is larger than the image, as torchvision pads).
    ShortSideThenCenterCrop(usize),
}

/// What turns decoded pixels into the model's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// The model's input height, width and channels (taken from the model by the caller).
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub resize: Resize,
    /// The resampling filter of the resize (Pillow's; bilinear by default, as
    /// torchvision's `Resize`).
    pub interpolation: super::resample::Interpolation,
    pub channel_order: ChannelOrder,
    pub layout: Layout,
    /// Multiplies the raw 0..255 bytes (1/255 or 1); float arrays are multiplied as stored.
    pub scale: f32,
    /// Per model input channel (after the channel order is applied), after scaling;
    /// length 1 (all channels) or `channels`. Output = (raw * scale - mean) / std.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// The preset names [`Preprocess::preset`] knows.
    pub const PRESETS: [&'static str; 4] = ["imagenet", "cifar", "mnist", "raw"];

    /// Presets: "imagenet" (short side 256 -> center crop, /255, mean [0.485,0.456,0.406], std [0.229,0.224,0.225]),
    /// "cifar" (exact size, /255, mean [0.4914,0.4822,0.4465], std [0.2470,0.2435,0.2616]),
    /// "mnist" (exact size, /255, mean 0.1307, std 0.3081), "raw" (exact size, no scaling: 0..255 floats, mean 0 std 1).
    /// The short side for imagenet is round(H * 256/224). Channel order RGB.
    pub fn preset(
        name: &str,
        height: usize,
        width: usize,
        channels: usize,
        layout: Layout,
    ) -> Result<Preprocess> {
        let (resize, scale, mean, std): (Resize, f32, Vec<f32>, Vec<f32>) =
            match name.trim().to_ascii_lowercase().as_str() {
                "imagenet" => (
                    Resize::ShortSideThenCenterCrop(
                        (height as f64 * 256.0 / 224.0).round() as usize
                    ),
                    1.0 / 255.0,
                    vec![0.485, 0.456, 0.406],
                    vec![0.229, 0.224, 0.225],
                ),
                "cifar" => (
                    Resize::Exact,
                    1.0 / 255.0,
                    vec![0.4914, 0.4822, 0.4465],
                    vec![0.2470, 0.2435, 0.2616],
                ),
                "mnist" => (Resize::Exact, 1.0 / 255.0, vec![0.1307], vec![0.3081]),
                "raw" => (Resize::Exact, 1.0, vec![0.0], vec![1.0]),
                _ => {
                    return Err(Error::Usage(format!(
                        "unknown preprocessing preset '{name}': expected one of {}",
                        Self::PRESETS.join(", ")
                    )))
                }
            };
        if mean.len() > 1 && channels != mean.len() {
            return Err(Error::Usage(format!(
                "preprocessing preset '{name}' normalises {} channels, but the model input has {channels}",
                mean.len()
            )));
        }
        let pre = Preprocess {
            height,
            width,
            channels,
            resize,
            interpolation: Default::default(),
            channel_order: ChannelOrder::Rgb,
            layout,
            scale,
            mean,
            std,
        };
        pre.validate()?;
        Ok(pre)
    }

    /// Checks that the settings are usable (sizes, mean/std lengths, non-zero std).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Usage(m));
        if self.height == 0 || self.width == 0 || self.channels == 0 {
            return bad(format!(
                "model input {}x{}x{} (HxWxC) has an empty dimension",
                self.height, self.width, self.channels
            ));
        }
        for (what, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() != self.channels {
                return bad(format!(
                    "{what} has {} values; want 1 or {} (the model's channels)",
                    v.len(),
                    self.channels
                ));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return bad(format!("{what} {v:?} is not finite"));
            }
        }
        if self.std.contains(&0.0) {
            return bad(format!("std {:?} has a zero", self.std));
        }
        if !self.scale.is_finite() {
            return bad(format!("scale {} is not finite", self.scale));
        }
        if self.channel_order == ChannelOrder::Bgr && !matches!(self.channels, 1 | 3) {
            return bad(format!(
                "BGR channel order needs a 3-channel input, the model has {}",
                self.channels
            ));
        }
        if let Resize::ShortSideThenCenterCrop(0) = self.resize {
            return bad("resize short side 0".into());
        }
        Ok(())
    }

    /// One line for reports: "224x224x3 NCHW RGB, short side 256 + centre crop, x*0.00392, mean [..], std [..]".
    pub fn describe(&self) -> String {
        let resize = match self.resize {
            Resize::None => "no resize".to_string(),
            Resize::Exact => format!("{} resize", self.interpolation),
            Resize::ShortSideThenCenterCrop(s) => {
                format!("{} short side {s} + centre crop", self.interpolation)
            }
        };
        let scale = if (self.scale - 1.0 / 255.0).abs() < 1e-9 {
            "/255".to_string()
        } else {
            format!("x{}", self.scale)
        };
        format!(
            "{}x{}x{} (HxWxC) {} {}, {resize}, {scale}, mean {:?}, std {:?}",
            self.height,
            self.width,
            self.channels,
            self.layout,
            self.channel_order,
            self.mean,
            self.std
        )
    }

    pub(crate) fn apply_u8(&self, view: &View<'_, u8>, dst: &mut [f32]) -> Result<(), String> {
        self.apply(view, dst)
    }

    pub(crate) fn apply_f32(&self, view: &View<'_, f32>, dst: &mut [f32]) -> Result<(), String> {
        self.apply(view, dst)
    }

    /// Channels, geometry, values; errors are messages the caller prefixes with the
    /// file and record.
    fn apply<T: Sample>(&self, view: &View<'_, T>, dst: &mut [f32]) -> Result<(), String> {
        let (oh, ow, oc) = (self.height, self.width, self.channels);
        debug_assert_eq!(dst.len(), oh * ow * oc);
        // 1. channels: to an interleaved image with `oc` channels, or 1 channel that is
        //    replicated on output.
        let (mut data, c) = if view.c == oc {
            (view.interleaved(), oc)
        } else if view.c == 3 && oc == 1 {
            (view.luma(), 1)
        } else if view.c == 1 {
            (view.interleaved(), 1)
        } else {
            return Err(format!(
                "image has {} channels, the model input has {oc}",
                view.c
            ));
        };
        let (h, w) = (view.h, view.w);
        // 2. geometry: resized size and the crop's offset into it (negative = padding).
        let (rh, rw, top, left) = match self.resize {
            Resize::None => {
                if (h, w) != (oh, ow) {
                    return Err(format!(
                        "image is {h}x{w} (HxW) but the model input is {oh}x{ow} and no resize was asked"
                    ));
                }
                (h, w, 0isize, 0isize)
            }
            Resize::Exact => (oh, ow, 0, 0),
            Resize::ShortSideThenCenterCrop(s) => {
                let (rh, rw) = short_side_size(h, w, s);
                (rh, rw, crop_offset(rh, oh), crop_offset(rw, ow))
            }
        };
        if (rh, rw) != (h, w) {
            if rh.saturating_mul(rw).saturating_mul(c) > MAX_RESIZED_VALUES {
                return Err(format!(
                    "image {h}x{w} (HxW) would resize to {rh}x{rw}, beyond the {MAX_RESIZED_VALUES}-value limit"
                ));
            }
            if rh == 0 || rw == 0 {
                return Err(format!(
                    "image {h}x{w} (HxW) would resize to an empty {rh}x{rw}"
                ));
            }
            data = T::resize(&data, (h, w, c), (rh, rw), self.interpolation);
        }
        // 3. values, written in the model's layout: (raw * scale - mean[k]) / std[k],
        //    from a per-channel table for bytes.
        let norm = |k: usize, raw: f32| {
            let m = self.mean[if self.mean.len() == 1 { 0 } else { k }];
            let s = self.std[if self.std.len() == 1 { 0 } else { k }];
            (raw * self.scale - m) / s
        };
        let lut: Vec<[f32; 256]> = if T::IS_BYTE {
            (0..oc)
                .map(|k| std::array::from_fn(|b| norm(k, b as f32)))
                .collect()
        } else {
            Vec::new()
        };
        let value = |k: usize, raw: T| {
            if T::IS_BYTE {
                lut[k][raw.byte() as usize]
            } else {
                norm(k, raw.to_f32())
            }
        };
        let pad: Vec<f32> = (0..oc).map(|k| norm(k, 0.0)).collect();
        let src_channel: Vec<usize> = (0..oc)
            .map(|k| {
                if c == 1 {
                    0
                } else if self.channel_order == ChannelOrder::Bgr && c == 3 {
                    2 - k
                } else {
                    k
                }
            })
            .collect();
        let plane = oh * ow;
        for y in 0..oh {
            let sy = y as isize + top;
            let row_inside = sy >= 0 && (sy as usize) < rh;
            for x in 0..ow {
                let sx = x as isize + left;
                let inside = row_inside && sx >= 0 && (sx as usize) < rw;
                let base = if inside {
                    (sy as usize * rw + sx as usize) * c
                } else {
                    0
                };
                for k in 0..oc {
                    let v = if inside {
                        value(k, data[base + src_channel[k]])
                    } else {
                        pad[k]
                    };
                    let i = match self.layout {
                        Layout::Nchw => k * plane + y * ow + x,
                        Layout::Nhwc => (y * ow + x) * oc + k,
                    };
                    dst[i] = v;
                }
            }
        }
        Ok(())
    }
}

/// Largest intermediate (resized, before the crop) image, in values: a 1x10000 image
/// resized to a short side of 256 would otherwise ask for gigabytes.
const MAX_RESIZED_VALUES: usize = 1 << 27;

/// torchvision's `_compute_resized_output_size` for an int size: the short side
/// becomes `s`, the long side `int(s * long / short)`. Returns (height, width).
pub(crate) fn short_side_size(h: usize, w: usize, s: usize) -> (usize, usize) {
    if w <= h {
        let long = (s as f64 * h as f64 / w as f64) as usize;
        (long, s)
    } else {
        let long = (s as f64 * w as f64 / h as f64) as usize;
        (s, long)
    }
}

/// torchvision's centre-crop offset `int(round((size - crop) / 2.0))` (Python rounds
/// halves to even); when the crop is larger, minus the left/top padding `(crop - size) // 2`.
pub(crate) fn crop_offset(size: usize, crop: usize) -> isize {
    if crop > size {
        -(((crop - size) / 2) as isize)
    } else {
        let d = size - crop;
        let half = d / 2;
        let r = if d % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        };
        r as isize
    }
}

/// A borrowed image: `h x w x c` values, planar (C x H x W) or interleaved (H x W x C).
pub(crate) struct View<'a, T> {
    data: &'a [T],
    pub h: usize,
    pub w: usize,
    pub c: usize,
    planar: bool,
}

impl<'a, T: Sample> View<'a, T> {
    pub(crate) fn new(data: &'a [T], h: usize, w: usize, c: usize, planar: bool) -> Self {
        debug_assert_eq!(data.len(), h * w * c);
        View {
            data,
            h,
            w,
            c,
            planar,
        }
    }

    fn interleaved(&self) -> Vec<T> {
        if !self.planar || self.c == 1 {
            return self.data.to_vec();
        }
        let plane = self.h * self.w;
        let mut out = Vec::with_capacity(self.data.len());
        for p in 0..plane {
            for k in 0..self.c {
                out.push(self.data[k * plane + p]);
            }
        }
        out
    }

    fn luma(&self) -> Vec<T> {
        let plane = self.h * self.w;
        (0..plane)
            .map(|p| {
                let at = |k: usize| {
                    if self.planar {
                        self.data[k * plane + p]
                    } else {
                        self.data[p * 3 + k]
                    }
                };
                T::luma(at(0), at(1), at(2))
            })
            .collect()
    }
}

/// Pixel types the pipeline handles: bytes (rounded like PIL) and floats.
pub(crate) trait Sample: Copy + Send + Sync + 'static {
    /// Bytes take their normalised values from a 256-entry table.
    const IS_BYTE: bool;
    fn byte(self) -> u8;
    fn luma(r: Self, g: Self, b: Self) -> Self;
    fn to_f32(self) -> f32;
    fn resize(
        src: &[Self],
        from: (usize, usize, usize),
        to: (usize, usize),
        how: super::resample::Interpolation,
    ) -> Vec<Self>;
}

impl Sample for u8 {
    const IS_BYTE: bool = true;
    fn byte(self) -> u8 {
        self
    }
    /// PIL's `L24`: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, i.e. 0.299/0.587/0.114.
    fn luma(r: u8, g: u8, b: u8) -> u8 {
        ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn resize(
        src: &[u8],
        from: (usize, usize, usize),
        to: (usize, usize),
        how: super::resample::Interpolation,
    ) -> Vec<u8> {
        resample::resize_u8(src, from, to, how)
    }
}

impl Sample for f32 {
    const IS_BYTE: bool = false;
    fn byte(self) -> u8 {
        self as u8
    }
    fn luma(r: f32, g: f32, b: f32) -> f32 {
        0.299 * r + 0.587 * g + 0.114 * b
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn resize(
        src: &[f32],
        from: (usize, usize, usize),
        to: (usize, usize),
        how: super::resample::Interpolation,
    ) -> Vec<f32> {
        resample::resize_f32(src, from, to, how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_geometry() {
        // 1024 wide x 683 high -> short side 256: long int(256*1024/683) = int(383.78) = 383.
        assert_eq!(short_side_size(683, 1024, 256), (256, 383));
        assert_eq!(short_side_size(512, 512, 256), (256, 256));
        // (383-224)/2 = 79.5 -> round half to even = 80; (256-224)/2 = 16.
        assert_eq!(crop_offset(383, 224), 80);
        assert_eq!(crop_offset(256, 224), 16);
        assert_eq!(crop_offset(225, 224), 0); // round(0.5) = 0
        assert_eq!(crop_offset(227, 224), 2); // round(1.5) = 2
        assert_eq!(crop_offset(200, 224), -12);
        assert_eq!(crop_offset(201, 224), -11); // pad left (23 // 2) = 11
    }

    #[test]
    fn luma_matches_pil() {
        assert_eq!(u8::luma(255, 255, 255), 255);
        assert_eq!(u8::luma(255, 0, 0), 76); // 0.299 * 255 = 76.2
        assert_eq!(u8::luma(0, 255, 0), 150); // 0.587 * 255 = 149.7
        assert_eq!(u8::luma(0, 0, 255), 29); // 0.114 * 255 = 29.07
    }
}
