//! Shared helpers for the data tests: temp dirs and small generated fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Real data, read in place (never copied into the repo).
pub const SHARED: &str = "../shared/data";

/// A fresh, empty directory under the system temp dir, unique per test and process.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join("medssl-data-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic pseudo-random pixel bytes.
pub fn pixels(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Writes a `w × h` image with `c` (1 or 3) channels; the format follows the extension.
pub fn write_image(path: &Path, w: u32, h: u32, c: usize, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data = pixels((w * h) as usize * c, seed);
    if c == 1 {
        image::GrayImage::from_raw(w, h, data)
            .unwrap()
            .save(path)
            .unwrap();
    } else {
        image::RgbImage::from_raw(w, h, data)
            .unwrap()
            .save(path)
            .unwrap();
    }
}

/// A medssl raw directory with the given labels/splits and random pixels.
pub fn write_raw(
    dir: &Path,
    h: usize,
    w: usize,
    c: usize,
    labels: &[u8],
    split: &[u8],
    classes: &[&str],
) {
    std::fs::create_dir_all(dir).unwrap();
    let n = labels.len();
    std::fs::write(dir.join("images.u8"), pixels(n * h * w * c, 7)).unwrap();
    std::fs::write(dir.join("labels.u8"), labels).unwrap();
    std::fs::write(dir.join("split.u8"), split).unwrap();
    let meta = serde_json::json!({"N": n, "H": h, "W": w, "C": c, "classes": classes});
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
}

pub const ISIC_HEADER: &str = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC";

/// An ISIC-style CSV + images folder: `per_class` images of each of the 7 classes, 20×15 JPEGs
/// (every 3rd one a PNG). Returns the CSV path.
pub fn write_isic(dir: &Path, per_class: usize) -> PathBuf {
    let img_dir = dir.join("ISIC2018_Task3_Training_Input");
    let gt_dir = dir.join("ISIC2018_Task3_Training_GroundTruth");
    std::fs::create_dir_all(&gt_dir).unwrap();
    let mut csv = String::from(ISIC_HEADER);
    csv.push('\n');
    let mut k = 0;
    for i in 0..per_class {
        for c in 0..7 {
            let id = format!("ISIC_{:07}", k);
            let ext = if k % 3 == 2 { "png" } else { "jpg" };
            write_image(
                &img_dir.join(format!("{id}.{ext}")),
                20,
                15,
                3,
                k as u64 + 1,
            );
            let onehot: Vec<&str> = (0..7).map(|j| if j == c { "1.0" } else { "0.0" }).collect();
            csv.push_str(&format!("{id},{}\n", onehot.join(",")));
            k += 1;
            let _ = i;
        }
    }
    let p = gt_dir.join("ISIC2018_Task3_Training_GroundTruth.csv");
    std::fs::write(&p, csv).unwrap();
    p
}

/// An image folder `root/<class>/img_k.png`, `per_class` 16×16 images per class.
pub fn write_folder(root: &Path, classes: &[&str], per_class: usize, c: usize) {
    for (ci, cl) in classes.iter().enumerate() {
        for k in 0..per_class {
            write_image(
                &root.join(cl).join(format!("img_{k}.png")),
                16,
                16,
                c,
                (ci * 100 + k) as u64,
            );
        }
    }
}

/// The error message of a failed result (panics on success).
pub fn err<T>(r: medssl::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e.to_string(),
    }
}

/// One `.npy` array: name, numpy descr (`|u1`, `<i8`), shape, raw little-endian bytes.
pub struct Npy<'a> {
    pub name: &'a str,
    pub descr: &'a str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Writes a `.npz` (zip of `.npy` v1.0 files, stored).
pub fn write_npz(path: &Path, arrays: &[Npy]) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for a in arrays {
        let shape = match a.shape.len() {
            1 => format!("({},)", a.shape[0]),
            _ => format!(
                "({})",
                a.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            a.descr
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&a.data);
        z.start_file(
            format!("{}.npy", a.name),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
}

/// A MedMNIST-style npz: `n` RGB (or grey when `c == 1`) `h×w` images per split, i64 labels
/// `[n, 1]` cycling over `k` classes.
pub fn medmnist_arrays(n: usize, h: usize, w: usize, c: usize, k: usize) -> Vec<Npy<'static>> {
    let mut v = Vec::new();
    for s in ["train", "val", "test"] {
        let shape = if c == 1 {
            vec![n, h, w]
        } else {
            vec![n, h, w, c]
        };
        v.push(Npy {
            name: Box::leak(format!("{s}_images").into_boxed_str()),
            descr: "|u1",
            shape,
            data: pixels(n * h * w * c, n as u64),
        });
        v.push(Npy {
            name: Box::leak(format!("{s}_labels").into_boxed_str()),
            descr: "<i8",
            shape: vec![n, 1],
            data: (0..n)
                .flat_map(|i| ((i % k) as i64).to_le_bytes())
                .collect(),
        });
    }
    v
}
