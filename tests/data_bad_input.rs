//! Bad input: each case stops with an error that names the file (and row) and the problem.

mod data_common;

use std::path::Path;

use data_common::*;
use medssl::data::{load, partition, Format, Labeled, LoadOptions};

fn opts(format: Option<Format>, image_size: Option<usize>) -> LoadOptions {
    LoadOptions {
        format,
        image_size,
        classes: None,
    }
}

fn load_err(path: &Path, o: &LoadOptions) -> String {
    err(load(path, o))
}

fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} lacks {p:?}");
    }
}

// ---------- medssl raw ----------

fn raw_ok(name: &str) -> std::path::PathBuf {
    let d = tmpdir(name);
    write_raw(
        &d,
        4,
        4,
        3,
        &[0, 1, 0, 1, 0, 1],
        &[0, 0, 0, 0, 1, 2],
        &["a", "b"],
    );
    d
}

#[test]
fn raw_fixture_is_valid() {
    let ds = load(raw_ok("raw-valid"), &opts(None, None)).unwrap();
    assert_eq!(ds.len(), 6);
}

#[test]
fn raw_truncated_images() {
    let d = raw_ok("raw-trunc");
    let p = d.join("images.u8");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 5]).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["images.u8", "283 bytes, expected 288", "truncated"],
    );
}

#[test]
fn raw_label_out_of_range() {
    let d = raw_ok("raw-label");
    std::fs::write(d.join("labels.u8"), [0u8, 1, 0, 7, 0, 1]).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["labels.u8", "row 3", "label 7 out of range"],
    );
}

#[test]
fn raw_bad_split_code() {
    let d = raw_ok("raw-split");
    std::fs::write(d.join("split.u8"), [0u8, 0, 0, 0, 3, 2]).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["split.u8", "row 4", "split code 3"],
    );
}

#[test]
fn raw_missing_labels_file() {
    let d = raw_ok("raw-missing");
    std::fs::remove_file(d.join("labels.u8")).unwrap();
    has(
        &load_err(&d, &opts(Some(Format::Raw), None)),
        &["labels.u8", "No such file"],
    );
}

#[test]
fn raw_bad_meta() {
    let d = raw_ok("raw-meta");
    std::fs::write(
        d.join("meta.json"),
        r#"{"N": 6, "H": 4, "C": 3, "classes": ["a","b"]}"#,
    )
    .unwrap();
    has(
        &load_err(&d, &opts(Some(Format::Raw), None)),
        &["meta.json", "\"W\""],
    );
    std::fs::write(d.join("meta.json"), "{not json").unwrap();
    has(
        &load_err(&d, &opts(Some(Format::Raw), None)),
        &["meta.json", "invalid JSON"],
    );
}

#[test]
fn raw_benchmark_files_must_come_in_pairs() {
    let d = raw_ok("raw-bench");
    std::fs::write(d.join("split_racmt.u8"), [0u8; 6]).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["racmt_row.u16", "missing"],
    );
    std::fs::write(d.join("racmt_row.u16"), [0u8; 11]).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["racmt_row.u16", "11 bytes, expected 12"],
    );
}

// ---------- JPEG pack ----------

fn jpeg_bytes(seed: u64) -> Vec<u8> {
    let img = image::RgbImage::from_raw(20, 15, pixels(20 * 15 * 3, seed)).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn write_pack(d: &Path, parts: &[Vec<u8>], idx_fix: impl Fn(&mut Vec<u64>)) {
    let mut bin = Vec::new();
    let mut idx = vec![0u64];
    for p in parts {
        bin.extend_from_slice(p);
        idx.push(bin.len() as u64);
    }
    idx_fix(&mut idx);
    std::fs::write(d.join("jpeg_200x150.bin"), bin).unwrap();
    std::fs::write(
        d.join("jpeg_200x150.idx"),
        idx.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
}

#[test]
fn jpeg_pack_good_and_corrupt_image() {
    let d = raw_ok("pack");
    let mut parts: Vec<Vec<u8>> = (0..6).map(jpeg_bytes).collect();
    write_pack(&d, &parts, |_| {});
    let ds = load(&d, &opts(Some(Format::JpegPack), Some(8))).unwrap();
    assert_eq!((ds.len(), ds.height, ds.channels), (6, 8, 3));
    // Autodetected for sizes above the native 4 px.
    assert_eq!(
        load(&d, &opts(None, Some(8))).unwrap().format,
        Format::JpegPack
    );
    parts[4] = b"definitely not a jpeg".to_vec();
    write_pack(&d, &parts, |_| {});
    has(
        &load_err(&d, &opts(Some(Format::JpegPack), Some(8))),
        &["jpeg_200x150.bin", "image 4", "cannot decode"],
    );
}

#[test]
fn jpeg_pack_offsets_mismatch() {
    let d = raw_ok("pack-idx");
    let parts: Vec<Vec<u8>> = (0..6).map(jpeg_bytes).collect();
    write_pack(&d, &parts, |idx| *idx.last_mut().unwrap() += 10);
    has(
        &load_err(&d, &opts(Some(Format::JpegPack), Some(8))),
        &["jpeg_200x150.idx", "last offset", "truncated"],
    );
    write_pack(&d, &parts, |idx| idx.swap(2, 3));
    has(
        &load_err(&d, &opts(Some(Format::JpegPack), Some(8))),
        &["jpeg_200x150.idx", "not increasing at image 2"],
    );
    write_pack(&d, &parts, |idx| {
        idx.pop();
    });
    has(
        &load_err(&d, &opts(Some(Format::JpegPack), Some(8))),
        &["jpeg_200x150.idx", "expected 56"],
    );
}

// ---------- npz ----------

#[test]
fn npz_truncated_archive() {
    let d = tmpdir("npz-trunc");
    let b = std::fs::read(Path::new(SHARED).join("pneumoniamnist/pneumoniamnist.npz")).unwrap();
    let p = d.join("cut.npz");
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    has(&load_err(&p, &opts(None, None)), &["cut.npz"]);
}

#[test]
fn npz_truncated_array() {
    let d = tmpdir("npz-trunc-array");
    let p = d.join("x.npz");
    let mut a = medmnist_arrays(4, 5, 5, 1, 2);
    a[2].data.truncate(50); // val_images: 4*25 = 100 bytes expected
    write_npz(&p, &a);
    has(&load_err(&p, &opts(None, None)), &["x.npz", "val_images"]);
}

#[test]
fn npz_missing_array() {
    let d = tmpdir("npz-missing");
    let p = d.join("x.npz");
    let mut a = medmnist_arrays(4, 5, 5, 1, 2);
    a.retain(|x| x.name != "test_labels");
    write_npz(&p, &a);
    has(
        &load_err(&p, &opts(None, None)),
        &["x.npz", "missing array 'test_labels'"],
    );
}

#[test]
fn npz_label_shape_and_dtype() {
    let d = tmpdir("npz-shape");
    let p = d.join("x.npz");
    let mut a = medmnist_arrays(4, 5, 5, 1, 2);
    a[1].shape = vec![2, 2];
    write_npz(&p, &a);
    has(
        &load_err(&p, &opts(None, None)),
        &["x.npz", "train_labels", "shape [2, 2]"],
    );
    let mut a = medmnist_arrays(4, 5, 5, 1, 2);
    a[0].descr = "<f4";
    a[0].data = vec![0u8; 4 * 25 * 4];
    write_npz(&p, &a);
    has(
        &load_err(&p, &opts(None, None)),
        &["x.npz", "train_images", "expected uint8"],
    );
}

#[test]
fn npz_label_out_of_range_for_meta_classes() {
    let d = tmpdir("npz-range");
    let p = d.join("x.npz");
    write_npz(&p, &medmnist_arrays(4, 5, 5, 1, 3));
    std::fs::write(d.join("meta.json"), r#"{"classes": ["a", "b"]}"#).unwrap();
    has(
        &load_err(&p, &opts(None, None)),
        &["x.npz", "row 2", "label 2 out of range", "meta.json"],
    );
}

// ---------- ISIC CSV ----------

fn isic_with_csv(name: &str, edit: impl Fn(&mut Vec<String>)) -> (std::path::PathBuf, String) {
    let d = tmpdir(name);
    let csv = write_isic(&d, 2);
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    edit(&mut lines);
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    let msg = load_err(&csv, &opts(None, None));
    (csv, msg)
}

#[test]
fn isic_no_positive_label() {
    let (_, m) = isic_with_csv("isic-none", |l| {
        l[3] = "ISIC_0000002,0.0,0.0,0.0,0.0,0.0,0.0,0.0".into()
    });
    has(
        &m,
        &[
            "GroundTruth.csv",
            "row 2 (line 4)",
            "ISIC_0000002",
            "no positive label",
        ],
    );
}

#[test]
fn isic_several_positive_labels() {
    let (_, m) = isic_with_csv("isic-many", |l| {
        l[5] = "ISIC_0000004,1.0,0.0,0.0,0.0,1.0,0.0,0.0".into()
    });
    has(
        &m,
        &[
            "GroundTruth.csv",
            "row 4 (line 6)",
            "several positive labels (MEL, BKL)",
        ],
    );
}

#[test]
fn isic_value_not_one_hot() {
    let (_, m) = isic_with_csv("isic-val", |l| {
        l[2] = "ISIC_0000001,0.0,0.5,0.0,0.0,0.0,0.0,0.0".into()
    });
    has(&m, &["GroundTruth.csv", "row 1", "NV is 0.5"]);
}

#[test]
fn isic_column_mismatch() {
    let (_, m) = isic_with_csv("isic-cols", |l| {
        l[7] = "ISIC_0000006,0.0,0.0,0.0,0.0,0.0,1.0".into()
    });
    has(
        &m,
        &[
            "GroundTruth.csv",
            "row 6 (line 8)",
            "7 fields, but the header has 8",
            "column mismatch",
        ],
    );
    let (_, m) = isic_with_csv("isic-head", |l| {
        l[0] = "img,MEL,NV,BCC,AKIEC,BKL,DF,VASC".into()
    });
    has(&m, &["GroundTruth.csv", "line 1", "first column is 'img'"]);
}

#[test]
fn isic_missing_image() {
    let d = tmpdir("isic-missing");
    let csv = write_isic(&d, 2);
    std::fs::remove_file(d.join("ISIC2018_Task3_Training_Input/ISIC_0000009.jpg")).unwrap();
    has(
        &load_err(&csv, &opts(None, None)),
        &["GroundTruth.csv", "row 9", "ISIC_0000009", "not found"],
    );
}

#[test]
fn isic_undecodable_image() {
    let d = tmpdir("isic-corrupt");
    let csv = write_isic(&d, 2);
    let img = d.join("ISIC2018_Task3_Training_Input/ISIC_0000003.jpg");
    std::fs::write(&img, b"\xff\xd8\xff garbage").unwrap();
    has(
        &load_err(&csv, &opts(None, None)),
        &["ISIC_0000003.jpg", "row 3", "cannot decode"],
    );
}

#[test]
fn isic_wrong_image_size() {
    let d = tmpdir("isic-size");
    let csv = write_isic(&d, 2);
    write_image(
        &d.join("ISIC2018_Task3_Training_Input/ISIC_0000004.jpg"),
        21,
        15,
        3,
        5,
    );
    has(
        &load_err(&csv, &opts(None, None)),
        &["ISIC_0000004.jpg", "row 4", "21x15", "20x15"],
    );
    // With a requested size every image is resized, so the set loads.
    assert_eq!(load(&csv, &opts(None, Some(16))).unwrap().len(), 14);
}

#[test]
fn isic_ambiguous_image_file() {
    let d = tmpdir("isic-ambiguous");
    let csv = write_isic(&d, 2);
    write_image(
        &d.join("ISIC2018_Task3_Training_Input/ISIC_0000005.jpg"),
        20,
        15,
        3,
        5,
    );
    has(
        &load_err(&csv, &opts(None, None)),
        &["row 5", "'ISIC_0000005' is ambiguous", "ISIC_0000005.png"],
    );
}

#[test]
fn isic_duplicate_image_row() {
    let (_, m) = isic_with_csv("isic-dup", |l| {
        l[4] = "ISIC_0000000,0.0,0.0,0.0,1.0,0.0,0.0,0.0".into()
    });
    has(&m, &["row 3", "'ISIC_0000000' already listed", "row 0"]);
}

// ---------- image folder ----------

#[test]
fn folder_wrong_image_size() {
    let d = tmpdir("folder-size");
    write_folder(&d, &["a", "b"], 3, 3);
    write_image(&d.join("b/img_1.png"), 17, 16, 3, 1);
    has(
        &load_err(&d, &opts(None, None)),
        &["b/img_1.png", "17x16", "16x16", "--image-size"],
    );
}

#[test]
fn folder_unknown_class_folder() {
    let d = tmpdir("folder-unknown");
    write_folder(&d.join("train"), &["a", "b"], 3, 1);
    write_folder(&d.join("val"), &["a", "b", "c"], 1, 1);
    has(
        &load_err(&d, &opts(None, None)),
        &["val/c", "unknown class folder 'c'"],
    );
    let d = tmpdir("folder-unknown-given");
    write_folder(&d, &["a", "b", "zebra"], 3, 1);
    let o = LoadOptions {
        classes: Some(vec!["a".into(), "b".into()]),
        ..Default::default()
    };
    has(&load_err(&d, &o), &["zebra", "unknown class folder"]);
}

#[test]
fn folder_undecodable_image() {
    let d = tmpdir("folder-corrupt");
    write_folder(&d, &["a", "b"], 3, 1);
    std::fs::write(d.join("a/img_2.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["a/img_2.png", "cannot decode"],
    );
}

#[test]
fn folder_empty_class_and_stray_files() {
    let d = tmpdir("folder-empty");
    write_folder(&d, &["a", "b"], 3, 1);
    std::fs::create_dir_all(d.join("c")).unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["/c", "no images", "empty class"],
    );
    std::fs::remove_dir(d.join("c")).unwrap();
    std::fs::write(d.join("a/notes.txt"), b"x").unwrap();
    has(
        &load_err(&d, &opts(None, None)),
        &["a/notes.txt", "not a .png/.jpg/.jpeg"],
    );
    std::fs::remove_file(d.join("a/notes.txt")).unwrap();
    write_image(&d.join("loose.png"), 16, 16, 1, 3);
    has(
        &load_err(&d, &opts(None, None)),
        &["loose.png", "no class folder"],
    );
}

// ---------- splits ----------

#[test]
fn empty_class_after_stratified_split() {
    let d = tmpdir("split-small");
    write_folder(&d, &["a", "b"], 5, 1);
    std::fs::remove_file(d.join("b/img_0.png")).unwrap();
    std::fs::remove_file(d.join("b/img_1.png")).unwrap();
    std::fs::remove_file(d.join("b/img_2.png")).unwrap();
    let ds = load(&d, &opts(None, None)).unwrap();
    has(
        &err(partition(&ds, Labeled::Ratio(0.2), 0)),
        &["class 'b' has 2 image(s)", "empty after splitting"],
    );
}

#[test]
fn empty_class_in_official_train_split() {
    let d = tmpdir("split-official");
    // class 1 only appears in val/test
    write_raw(
        &d,
        4,
        4,
        1,
        &[0, 0, 1, 0, 1, 0],
        &[0, 0, 1, 0, 2, 2],
        &["a", "b"],
    );
    let ds = load(&d, &opts(None, None)).unwrap();
    has(
        &err(partition(&ds, Labeled::Ratio(0.5), 0)),
        &[
            "class 'b' has no training images",
            "split.u8",
            "empty class",
        ],
    );
}

#[test]
fn bad_options() {
    let d = raw_ok("opts");
    let ds = load(&d, &opts(None, None)).unwrap();
    has(
        &err(partition(&ds, Labeled::Ratio(0.0), 0)),
        &["--labeled-ratio 0", "(0, 1]"],
    );
    has(
        &err(partition(&ds, Labeled::Ratio(1.5), 0)),
        &["--labeled-ratio 1.5"],
    );
    has(
        &load_err(&d.join("nope"), &opts(None, None)),
        &["nope", "does not exist"],
    );
    has(
        &load_err(&d.join("meta.json"), &opts(None, None)),
        &["meta.json", "--format"],
    );
}
