//! ISIC-CSV and image-folder readers on small generated fixtures; splits and partition files.

mod data_common;

use data_common::*;
use medssl::data::{
    load, partition, read_partition, stratified_split, write_partition, Format, Labeled,
    LabeledProtocol, LoadOptions, Split,
};

fn opts(format: Option<Format>, image_size: Option<usize>) -> LoadOptions {
    LoadOptions {
        format,
        image_size,
        classes: None,
    }
}

#[test]
fn isic_csv_file_and_directory() {
    let dir = tmpdir("isic-ok");
    let csv = write_isic(&dir, 4);
    for path in [csv.clone(), dir.clone()] {
        let ds = load(&path, &opts(None, None)).unwrap();
        assert_eq!(ds.format, Format::IsicCsv);
        assert_eq!(
            (ds.len(), ds.height, ds.width, ds.channels),
            (28, 15, 20, 3)
        );
        assert_eq!(
            ds.classes,
            ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
        );
        assert_eq!(ds.class_counts(None), vec![4; 7]);
        assert!(ds.split.is_none());
        assert_eq!(ds.ids[0], "ISIC_0000000");
        assert_eq!(ds.labels[..8], [0, 1, 2, 3, 4, 5, 6, 0]);
        // Pixels are the PNG's exactly (lossless row 2).
        let png = image::open(dir.join("ISIC2018_Task3_Training_Input/ISIC_0000002.png"))
            .unwrap()
            .into_rgb8();
        assert_eq!(ds.image(2), png.as_raw().as_slice());
    }
    let ds = load(&csv, &opts(Some(Format::IsicCsv), Some(32))).unwrap();
    assert_eq!((ds.height, ds.width), (32, 32));
}

#[test]
fn isic_three_csvs_give_official_split_and_srcmt_rows() {
    let dir = tmpdir("isic-split");
    let img = dir.join("images");
    let mut k = 0;
    for (name, n) in [
        ("training.csv", 1500usize),
        ("validation.csv", 14),
        ("testing.csv", 14),
    ] {
        let mut csv = String::from(ISIC_HEADER);
        csv.push('\n');
        for r in 0..n {
            let c = r % 7;
            let id = format!("img{k}");
            // Tiny images keep the fixture fast.
            write_image(&img.join(format!("{id}.png")), 4, 4, 3, k as u64);
            let oh: Vec<&str> = (0..7).map(|j| if j == c { "1" } else { "0" }).collect();
            csv.push_str(&format!("{id},{}\n", oh.join(",")));
            k += 1;
        }
        std::fs::write(dir.join(name), csv).unwrap();
    }
    let ds = load(&dir, &opts(None, None)).unwrap();
    let split = ds.split.as_ref().unwrap();
    let count = |s| split.iter().filter(|&&x| x == s).count();
    assert_eq!(
        (count(Split::Train), count(Split::Val), count(Split::Test)),
        (1500, 14, 14)
    );
    let p = partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 0).unwrap();
    assert_eq!(p.labeled, (0..1400).collect::<Vec<_>>());
    assert_eq!(p.unlabeled, (1400..1500).collect::<Vec<_>>());
    assert_eq!((p.val.len(), p.test.len()), (14, 14));
}

#[test]
fn folder_flat_and_split_layouts() {
    let root = tmpdir("folder-ok");
    write_folder(&root, &["benign", "malignant", "normal"], 5, 1);
    // A colour image promotes the dataset to RGB.
    write_image(&root.join("normal/zz_colour.jpg"), 16, 16, 3, 99);
    // Hidden files are not data.
    std::fs::write(root.join("benign/.DS_Store"), b"x").unwrap();
    let ds = load(&root, &opts(None, None)).unwrap();
    assert_eq!(ds.format, Format::Folder);
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (16, 16, 16, 3)
    );
    assert_eq!(ds.classes, ["benign", "malignant", "normal"]);
    assert_eq!(ds.class_counts(None), vec![5, 5, 6]);
    assert!(ds.split.is_none());
    let g = image::open(root.join("benign/img_0.png"))
        .unwrap()
        .into_luma8();
    let px0 = g.as_raw()[0];
    assert_eq!(&ds.image(0)[..3], &[px0, px0, px0]);

    let root = tmpdir("folder-split");
    for (s, n) in [("train", 6), ("val", 2), ("test", 3)] {
        write_folder(&root.join(s), &["a", "b"], n, 1);
    }
    let ds = load(&root, &opts(None, Some(8))).unwrap();
    assert_eq!((ds.len(), ds.height, ds.channels), (22, 8, 1));
    let p = partition(&ds, Labeled::Ratio(0.5), 1).unwrap();
    assert_eq!((p.train.len(), p.val.len(), p.test.len()), (12, 4, 6));
    assert_eq!(p.labeled.len(), 6);
    assert!(p.split_source.starts_with("official"));
}

#[test]
fn stratified_split_is_seeded_and_stratified() {
    let root = tmpdir("strat");
    write_folder(&root, &["a", "b", "c"], 20, 1);
    let ds = load(&root, &opts(None, None)).unwrap();
    let p = partition(&ds, Labeled::Ratio(0.25), 3).unwrap();
    assert!(p.split_source.starts_with("stratified"));
    for c in 0..3 {
        assert_eq!(ds.class_counts(Some(&p.train))[c], 14);
        assert_eq!(ds.class_counts(Some(&p.val))[c], 2);
        assert_eq!(ds.class_counts(Some(&p.test))[c], 4);
        assert_eq!(ds.class_counts(Some(&p.labeled))[c], 4); // round(0.25 * 14)
    }
    // Disjoint and complete.
    let mut all: Vec<usize> = [&p.train[..], &p.val, &p.test].concat();
    all.sort();
    assert_eq!(all, (0..60).collect::<Vec<_>>());
    let mut tr: Vec<usize> = [&p.labeled[..], &p.unlabeled].concat();
    tr.sort();
    assert_eq!(tr, p.train);
    // Same seed, same partition; another seed, another one.
    assert_eq!(p, partition(&ds, Labeled::Ratio(0.25), 3).unwrap());
    let q = partition(&ds, Labeled::Ratio(0.25), 4).unwrap();
    assert_ne!(p.train, q.train);
    // Stand-alone split function agrees.
    let s = stratified_split(&ds.labels, &ds.classes, 3).unwrap();
    assert_eq!(s[0], p.train);
    // At least one labelled image per class even for tiny ratios.
    let tiny = partition(&ds, Labeled::Ratio(0.001), 3).unwrap();
    assert_eq!(ds.class_counts(Some(&tiny.labeled)), vec![1, 1, 1]);
    // Ratio 1: fully supervised.
    let full = partition(&ds, Labeled::Ratio(1.0), 3).unwrap();
    assert!(full.unlabeled.is_empty());
    assert_eq!(full.labeled, full.train);
}

#[test]
fn partition_files_round_trip() {
    let root = tmpdir("partfiles");
    write_folder(&root.join("data"), &["a", "b"], 10, 1);
    let ds = load(root.join("data"), &opts(None, None)).unwrap();
    let p = partition(&ds, Labeled::Ratio(0.3), 9).unwrap();
    let run = root.join("run");
    write_partition(&run, &p, &ds).unwrap();
    let lab: Vec<usize> = std::fs::read_to_string(run.join("labeled.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let unl: Vec<usize> = std::fs::read_to_string(run.join("unlabeled.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(lab, p.labeled);
    assert_eq!(unl, p.unlabeled);
    assert_eq!(read_partition(&run).unwrap(), p);
}

#[test]
fn npz_rgb_with_i64_column_labels() {
    let dir = tmpdir("npz-ok");
    let p = dir.join("dermamnist.npz");
    write_npz(&p, &medmnist_arrays(9, 6, 5, 3, 3));
    let ds = load(&p, &opts(None, None)).unwrap();
    assert_eq!(ds.format, Format::Npz);
    assert_eq!((ds.len(), ds.height, ds.width, ds.channels), (27, 6, 5, 3));
    assert_eq!(ds.classes, ["0", "1", "2"]);
    assert_eq!(ds.class_counts(None), vec![9, 9, 9]);
    assert_eq!(ds.labels[..4], [0, 1, 2, 0]);
    assert_eq!(ds.image(0), &pixels(9 * 6 * 5 * 3, 9)[..90]);
    let split = ds.split.as_ref().unwrap();
    assert_eq!(split[9], Split::Val);
    let ds = load(&p, &opts(None, Some(28))).unwrap();
    assert_eq!((ds.height, ds.width), (28, 28));
}
