//! Camera views: a worker thread per view keeps the latest frame (latest value wins, one frame
//! per view in memory); JPEG encoding happens when a request asks for it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use device_profiles::{CameraSettings, ViewSource};
use image::RgbImage;
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
};
use serde::Serialize;

use crate::health::{Backoff, Health, Stop, lock};

/// Why a frame could not be captured or encoded.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// No view with that index.
    #[error("no camera view {0}")]
    NoSuchView(usize),
    /// The view has no frame yet, or its source is down.
    #[error("camera view {view} is unavailable: {cause}")]
    Unavailable {
        /// View index.
        view: usize,
        /// Why.
        cause: String,
    },
    /// Decoding a device frame failed.
    #[error("cannot decode the frame of view {view}: {cause}")]
    Decode {
        /// View index.
        view: usize,
        /// Why.
        cause: String,
    },
    /// JPEG encoding failed.
    #[error("JPEG encoding failed: {0}")]
    Encode(#[from] jpeg_encoder::EncodingError),
    /// Even the smallest encoding is larger than the cap.
    #[error("the frame does not fit {cap} bytes even at quality {quality} and {width}x{height}")]
    TooLarge {
        /// The size cap.
        cap: usize,
        /// Last quality tried.
        quality: u8,
        /// Last width tried.
        width: u32,
        /// Last height tried.
        height: u32,
    },
}

/// Pixels of a captured frame.
#[derive(Debug)]
pub enum Pixels {
    /// RGB at the profile's resolution.
    Rgb(RgbImage),
    /// A device buffer as the camera delivered it (MJPEG or YUYV), decoded only on request.
    Device(nokhwa::Buffer),
}

/// One captured frame.
#[derive(Debug)]
pub struct Frame {
    /// When it was captured.
    pub captured: Instant,
    /// Sequence number within its view.
    pub seq: u64,
    /// The pixels.
    pub pixels: Pixels,
    /// Its JPEG once made: a frame is encoded once however many requests attach it, and a
    /// request that asks while another encodes it waits for that encoding.
    jpeg: Mutex<Option<Arc<EncodedJpeg>>>,
}

/// A frame's JPEG as [`encode_jpeg`] made it (bytes, quality, width, height), and the settings
/// asked for (width, height, quality, size cap).
type EncodedJpeg = ((Vec<u8>, u8, u32, u32), (u32, u32, u8, usize));

impl Frame {
    /// A frame captured now.
    pub fn new(seq: u64, pixels: Pixels) -> Self {
        Self { captured: Instant::now(), seq, pixels, jpeg: Mutex::new(None) }
    }

    /// The frame as a JPEG at `width` x `height` (`quality`, under `max_bytes`), encoded at the
    /// first call and the same bytes after for the same settings (a failure is not kept: the
    /// next call tries again).
    /// `view` names the frame's view in errors.
    pub fn jpeg(
        &self,
        view: usize,
        width: u32,
        height: u32,
        quality: u8,
        max_bytes: usize,
    ) -> Result<Jpeg, CameraError> {
        let settings = (width, height, quality, max_bytes);
        let mut cached = lock(&self.jpeg);
        let encoded = match &*cached {
            Some(encoded) if encoded.1 == settings => Arc::clone(encoded),
            _ => {
                let rgb =
                    frame_rgb(self, width, height).map_err(|cause| CameraError::Decode { view, cause })?;
                let encoded = Arc::new((encode_jpeg(&rgb, quality, max_bytes)?, settings));
                *cached = Some(Arc::clone(&encoded));
                encoded
            }
        };
        drop(cached);
        let ((bytes, quality, width, height), _) = &*encoded;
        Ok(Jpeg {
            bytes: bytes.clone(),
            width: *width,
            height: *height,
            quality: *quality,
            frame_age: self.captured.elapsed(),
        })
    }
}

/// A JPEG ready to send.
#[derive(Debug, Clone)]
pub struct Jpeg {
    /// The JPEG file bytes.
    pub bytes: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Quality used.
    pub quality: u8,
    /// Age of the frame when it was encoded.
    pub frame_age: Duration,
}

/// The latest frame of one view and its source's health.
#[derive(Debug, Default)]
pub struct ViewSlot {
    state: Mutex<(Option<Arc<Frame>>, Health)>,
}

/// What a view looks like now.
#[derive(Debug, Clone, Serialize)]
pub struct ViewStatus {
    /// Source health.
    pub health: Health,
    /// Age of the latest frame in milliseconds, if any.
    pub frame_age_ms: Option<u64>,
    /// Frames captured so far.
    pub frames: u64,
}

impl ViewSlot {
    /// Replaces the latest frame.
    pub fn put(&self, name: &str, frame: Frame) {
        let mut s = lock(&self.state);
        s.0 = Some(Arc::new(frame));
        s.1.ok(name);
    }
    /// Records a failure of the source.
    pub fn fail(&self, name: &str, cause: String) {
        lock(&self.state).1.fail(name, cause);
    }
    /// The latest frame (cheap: an Arc clone under a short lock).
    pub fn latest(&self) -> (Option<Arc<Frame>>, Health) {
        let s = lock(&self.state);
        (s.0.clone(), s.1.clone())
    }
    /// Status now.
    pub fn status(&self, now: Instant) -> ViewStatus {
        let (frame, health) = self.latest();
        ViewStatus {
            health,
            frame_age_ms: frame
                .as_ref()
                .map(|f| now.saturating_duration_since(f.captured).as_millis() as u64),
            frames: frame.map_or(0, |f| f.seq),
        }
    }
}

/// Converts a frame to RGB at the given size.
pub fn frame_rgb(frame: &Frame, width: u32, height: u32) -> Result<RgbImage, String> {
    let rgb = match &frame.pixels {
        Pixels::Rgb(img) => {
            if img.width() == width && img.height() == height {
                return Ok(img.clone());
            }
            img.clone()
        }
        Pixels::Device(buf) => buf.decode_image::<RgbFormat>().map_err(|e| e.to_string())?,
    };
    if rgb.width() == width && rgb.height() == height {
        Ok(rgb)
    } else {
        Ok(image::imageops::resize(&rgb, width, height, image::imageops::FilterType::Triangle))
    }
}

/// Encodes RGB pixels as JPEG at `quality`, lowering the quality in steps of 10 (down to 30)
/// and then halving the size until the result fits `max_bytes`.
pub fn encode_jpeg(
    img: &RgbImage,
    quality: u8,
    max_bytes: usize,
) -> Result<(Vec<u8>, u8, u32, u32), CameraError> {
    let mut current = std::borrow::Cow::Borrowed(img);
    let mut q = quality.clamp(1, 100);
    loop {
        let mut out = Vec::with_capacity(max_bytes.min(1 << 20));
        let (w, h) = (current.width(), current.height());
        let enc = jpeg_encoder::Encoder::new(&mut out, q);
        enc.encode(current.as_raw(), w as u16, h as u16, jpeg_encoder::ColorType::Rgb)?;
        if out.len() <= max_bytes {
            return Ok((out, q, w, h));
        }
        if q > 30 {
            q = q.saturating_sub(10).max(30);
        } else if w >= 64 && h >= 64 {
            current = std::borrow::Cow::Owned(image::imageops::resize(
                current.as_ref(),
                w / 2,
                h / 2,
                image::imageops::FilterType::Triangle,
            ));
        } else {
            return Err(CameraError::TooLarge { cap: max_bytes, quality: q, width: w, height: h });
        }
    }
}

/// Draws test pattern frame `n`: colour bars with a bar that moves one step per frame.
pub fn test_pattern(width: u32, height: u32, n: u64) -> RgbImage {
    const BARS: [[u8; 3]; 8] = [
        [235, 235, 235],
        [235, 235, 16],
        [16, 235, 235],
        [16, 235, 16],
        [235, 16, 235],
        [235, 16, 16],
        [16, 16, 235],
        [16, 16, 16],
    ];
    let mut img = RgbImage::new(width, height);
    let bar_x = ((n * 8) % u64::from(width.max(1))) as u32;
    let row_bytes = width as usize * 3;
    let mut row = vec![0u8; row_bytes];
    for (x, px) in row.chunks_exact_mut(3).enumerate() {
        let c = BARS[x * 8 / width.max(1) as usize];
        px.copy_from_slice(&c);
    }
    let raw: &mut [u8] = &mut img;
    for (y, line) in raw.chunks_exact_mut(row_bytes).enumerate() {
        line.copy_from_slice(&row);
        if (y as u32) < height / 4 {
            let x0 = bar_x as usize * 3;
            let x1 = ((bar_x + 16).min(width)) as usize * 3;
            line[x0..x1].fill(128);
        }
    }
    img
}

/// Resolves a V4L2 device path (possibly a `/dev/v4l/by-id/...` link) to nokhwa's index.
fn device_index(path: &Path) -> Result<u32, String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_prefix("video")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{} is not a /dev/videoN device", real.display()))
}

/// Everything a view worker needs.
#[derive(Debug, Clone)]
pub(crate) struct ViewWorker {
    pub name: String,
    pub source: ViewSource,
    pub camera: CameraSettings,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

impl ViewWorker {
    /// Runs until stopped.
    pub(crate) fn run(self, slot: Arc<ViewSlot>, stop: Arc<Stop>) {
        let mut backoff = Backoff::new(self.retry_initial_ms, self.retry_max_ms);
        let mut seq = 0u64;
        match self.source.clone() {
            ViewSource::TestPattern {} => {
                let period = Duration::from_secs_f64(1.0 / f64::from(self.camera.fps.max(1)));
                let mut next = Instant::now();
                while !stop.is_stopped() {
                    seq += 1;
                    let img = test_pattern(self.camera.width, self.camera.height, seq);
                    slot.put(&self.name, Frame::new(seq, Pixels::Rgb(img)));
                    next += period;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    if stop.sleep(next - now) {
                        break;
                    }
                }
            }
            ViewSource::Directory { path, hold_ms } => {
                let mut dir = DirectorySource::new(path, self.camera.width, self.camera.height);
                while !stop.is_stopped() {
                    let delay = match dir.next_image() {
                        Ok(img) => {
                            seq += 1;
                            slot.put(&self.name, Frame::new(seq, Pixels::Rgb(img)));
                            backoff.reset();
                            Duration::from_millis(hold_ms)
                        }
                        Err(cause) => {
                            slot.fail(&self.name, cause);
                            backoff.next_delay()
                        }
                    };
                    if stop.sleep(delay) {
                        break;
                    }
                }
            }
            ViewSource::Device { path } => {
                while !stop.is_stopped() {
                    let cause = self.run_device(&path, &slot, &stop, &mut seq, &mut backoff);
                    slot.fail(&self.name, cause);
                    if stop.sleep(backoff.next_delay()) {
                        break;
                    }
                }
            }
        }
    }

    /// Opens the device and captures until an error; returns the error's cause.
    fn run_device(
        &self,
        path: &Path,
        slot: &ViewSlot,
        stop: &Stop,
        seq: &mut u64,
        backoff: &mut Backoff,
    ) -> String {
        let index = match device_index(path) {
            Ok(i) => i,
            Err(e) => return e,
        };
        let format = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(CameraFormat::new(
            Resolution::new(self.camera.width, self.camera.height),
            FrameFormat::MJPEG,
            self.camera.fps,
        )));
        let mut cam = match nokhwa::Camera::new(CameraIndex::Index(index), format) {
            Ok(c) => c,
            Err(e) => return format!("{}: {e}", path.display()),
        };
        if let Err(e) = cam.open_stream() {
            return format!("{}: {e}", path.display());
        }
        while !stop.is_stopped() {
            match cam.frame() {
                Ok(buf) => {
                    *seq += 1;
                    slot.put(&self.name, Frame::new(*seq, Pixels::Device(buf)));
                    backoff.reset();
                }
                Err(e) => return format!("{}: {e}", path.display()),
            }
        }
        let _ = cam.stop_stream();
        "stopped".into()
    }
}

/// A directory of images shown in name order and cycled; malformed files are logged once (per
/// file version) and skipped.
#[derive(Debug)]
pub(crate) struct DirectorySource {
    path: PathBuf,
    width: u32,
    height: u32,
    last: Option<PathBuf>,
    bad: HashSet<(PathBuf, Option<SystemTime>, u64)>,
}

impl DirectorySource {
    pub(crate) fn new(path: PathBuf, width: u32, height: u32) -> Self {
        DirectorySource { path, width, height, last: None, bad: HashSet::new() }
    }

    fn listing(&self) -> Result<Vec<PathBuf>, String> {
        let entries = std::fs::read_dir(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        Ok(files)
    }

    /// The next decodable image after the last one shown, scaled to the view's size.
    pub(crate) fn next_image(&mut self) -> Result<RgbImage, String> {
        let files = self.listing()?;
        if files.is_empty() {
            return Err(format!("{} holds no images", self.path.display()));
        }
        let start = self.last.as_ref().map_or(0, |l| files.iter().position(|f| f > l).unwrap_or(0));
        for k in 0..files.len() {
            let f = &files[(start + k) % files.len()];
            let meta = std::fs::metadata(f).ok();
            let key = (
                f.clone(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.as_ref().map_or(0, |m| m.len()),
            );
            if self.bad.contains(&key) {
                continue;
            }
            match image::ImageReader::open(f)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.decode().map_err(|e| e.to_string()))
            {
                Ok(img) => {
                    self.last = Some(f.clone());
                    let rgb = img.into_rgb8();
                    return Ok(if rgb.width() == self.width && rgb.height() == self.height {
                        rgb
                    } else {
                        image::imageops::resize(
                            &rgb,
                            self.width,
                            self.height,
                            image::imageops::FilterType::Triangle,
                        )
                    });
                }
                Err(cause) => {
                    tracing::warn!(file = %f.display(), cause = %cause, "skipping an image that does not decode");
                    self.bad.insert(key);
                }
            }
        }
        Err(format!("{} holds no decodable images", self.path.display()))
    }

    /// How many files were found malformed.
    #[cfg(test)]
    pub(crate) fn malformed(&self) -> usize {
        self.bad.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_encoded_once_for_every_request_and_threads_share_the_encoding() {
        let frame = Arc::new(Frame::new(1, Pixels::Rgb(test_pattern(640, 480, 1))));
        let encode = |frame: &Frame| frame.jpeg(0, 640, 480, 80, 200_000).expect("encodes");
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let frame = Arc::clone(&frame);
                std::thread::spawn(move || encode(&frame).bytes)
            })
            .collect();
        let first = encode(&frame);
        for thread in threads {
            assert_eq!(thread.join().expect("encodes"), first.bytes);
        }
        let cached = lock(&frame.jpeg).clone().expect("kept with the frame");
        assert_eq!(cached.0.0, first.bytes);
        let again = encode(&frame);
        assert!(Arc::ptr_eq(&cached, lock(&frame.jpeg).as_ref().expect("kept")), "not encoded again");
        assert!(again.frame_age >= first.frame_age, "the age is the frame's now");
        assert_eq!((again.width, again.height, again.quality), (640, 480, 80));
        // Other settings make another encoding.
        let small = frame.jpeg(0, 320, 240, 80, 200_000).expect("encodes");
        assert_eq!((small.width, small.height), (320, 240));
    }

    fn write_png(path: &Path, colour: [u8; 3]) {
        RgbImage::from_pixel(64, 48, image::Rgb(colour)).save(path).unwrap();
    }

    #[test]
    fn jpeg_encodes_at_quality_and_respects_the_cap() {
        let img = test_pattern(640, 480, 3);
        let (bytes, q, w, h) = encode_jpeg(&img, 80, 150_000).unwrap();
        assert_eq!((q, w, h), (80, 640, 480));
        assert_eq!(&bytes[..2], &[0xFF, 0xD8]);
        let back = image::load_from_memory(&bytes).unwrap();
        assert_eq!((back.width(), back.height()), (640, 480));
        // Noise does not compress: the cap forces lower quality, then a smaller frame.
        let mut noise = RgbImage::new(640, 480);
        let mut x = 12345u32;
        for p in noise.pixels_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *p = image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8]);
        }
        let (bytes, q, w, _) = encode_jpeg(&noise, 90, 40_000).unwrap();
        assert!(bytes.len() <= 40_000);
        assert!(q == 30 && w < 640, "q {q} w {w}");
        assert!(matches!(encode_jpeg(&noise, 90, 100), Err(CameraError::TooLarge { .. })));
    }

    #[test]
    fn the_test_pattern_moves() {
        let a = test_pattern(320, 240, 1);
        let b = test_pattern(320, 240, 2);
        assert_eq!(a.dimensions(), (320, 240));
        assert_ne!(a, b);
    }

    #[test]
    fn a_directory_cycles_and_skips_a_malformed_image_once() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), [255, 0, 0]);
        std::fs::write(dir.path().join("b.png"), b"not a png at all").unwrap();
        write_png(&dir.path().join("c.png"), [0, 0, 255]);
        let mut src = DirectorySource::new(dir.path().to_owned(), 32, 24);
        let colours: Vec<[u8; 3]> = (0..4).map(|_| src.next_image().unwrap().get_pixel(0, 0).0).collect();
        assert_eq!(colours, [[255, 0, 0], [0, 0, 255], [255, 0, 0], [0, 0, 255]]);
        assert_eq!(src.malformed(), 1, "the bad file is tried once, then skipped");
        // Fixing the file brings it into the cycle.
        write_png(&dir.path().join("b.png"), [0, 255, 0]);
        let next: Vec<[u8; 3]> = (0..3).map(|_| src.next_image().unwrap().get_pixel(0, 0).0).collect();
        assert!(next.contains(&[0, 255, 0]), "{next:?}");
    }

    #[test]
    fn a_missing_or_empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = DirectorySource::new(dir.path().join("gone"), 32, 24);
        assert!(src.next_image().unwrap_err().contains("gone"));
        let mut empty = DirectorySource::new(dir.path().to_owned(), 32, 24);
        assert!(empty.next_image().unwrap_err().contains("no images"));
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let err = device_index(Path::new("/dev/video-none-here")).unwrap_err();
        assert!(err.contains("/dev/video-none-here"), "{err}");
        assert!(device_index(Path::new("/dev/null")).unwrap_err().contains("not a /dev/videoN"));
    }
}
