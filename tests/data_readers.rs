//! Every reader on the real files in ../shared/data: counts equal meta.json's.

mod data_common;

use std::collections::BTreeMap;
use std::path::Path;

use data_common::SHARED;
use medssl::data::{
    load, partition, Dataset, Format, Labeled, LabeledProtocol, LoadOptions, Split,
};

fn meta(name: &str) -> serde_json::Value {
    let p = Path::new(SHARED).join(name).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn opts(format: Option<Format>, image_size: Option<usize>) -> LoadOptions {
    LoadOptions {
        format,
        image_size,
        classes: None,
    }
}

/// class name → count over `ix`
fn named_counts(ds: &Dataset, ix: Option<&[usize]>) -> BTreeMap<String, u64> {
    ds.class_counts(ix)
        .into_iter()
        .enumerate()
        .map(|(c, n)| (ds.classes[c].clone(), n as u64))
        .collect()
}

fn json_counts(v: &serde_json::Value) -> BTreeMap<String, u64> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

fn split_ix(split: &[Split], s: Split) -> Vec<usize> {
    (0..split.len()).filter(|&i| split[i] == s).collect()
}

fn check_official(ds: &Dataset, m: &serde_json::Value, key: &str, split: &[Split]) {
    for s in Split::ALL {
        let ix = split_ix(split, s);
        assert_eq!(
            ix.len() as u64,
            m[key]["counts"][s.name()].as_u64().unwrap(),
            "{key} {s}"
        );
        assert_eq!(
            named_counts(ds, Some(&ix)),
            json_counts(&m[key]["class_counts"][s.name()]),
            "{key} {s} class counts"
        );
    }
}

#[test]
fn raw_ham10000_counts_match_meta() {
    let path = Path::new(SHARED).join("ham10000");
    let ds = load(&path, &opts(None, None)).unwrap();
    let m = meta("ham10000");
    assert_eq!(ds.format, Format::Raw);
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (10015, 28, 28, 3)
    );
    assert_eq!(
        ds.classes,
        ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    );
    assert_eq!(named_counts(&ds, None), json_counts(&m["class_counts"]));
    check_official(&ds, &m, "split", ds.split.as_ref().unwrap());
    let b = ds.benchmark.as_ref().unwrap();
    check_official(&ds, &m, "split_racmt", &b.split);
    // Official split drives the partition.
    let p = partition(&ds, Labeled::Ratio(0.2), 0).unwrap();
    assert_eq!(
        (p.train.len(), p.val.len(), p.test.len()),
        (6985, 1025, 2005)
    );
    assert_eq!(p.labeled.len() + p.unlabeled.len(), 6985);
    let lab = ds.class_counts(Some(&p.labeled));
    let train = ds.class_counts(Some(&p.train));
    for c in 0..7 {
        assert_eq!(lab[c], ((0.2 * train[c] as f64).round() as usize).max(1));
    }
}

#[test]
fn srcmt_full_protocol_labels_every_benchmark_training_row() {
    let ds = load(Path::new(SHARED).join("ham10000"), &opts(None, None)).unwrap();
    let full = partition(&ds, Labeled::Protocol(LabeledProtocol::SrcmtFull), 0).unwrap();
    let part = partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 0).unwrap();
    // Same train/val/test images as srcmt; labelled = srcmt's labelled + unlabelled.
    assert_eq!(
        (&full.train, &full.val, &full.test),
        (&part.train, &part.val, &part.test)
    );
    assert_eq!(full.labeled.len(), 7000);
    assert!(full.unlabeled.is_empty());
    let mut both: Vec<usize> = part
        .labeled
        .iter()
        .chain(&part.unlabeled)
        .copied()
        .collect();
    both.sort_unstable();
    assert_eq!(full.labeled, both);
    assert_eq!(
        "srcmt-full".parse::<LabeledProtocol>().unwrap(),
        LabeledProtocol::SrcmtFull
    );
    assert!("srcmt-ful".parse::<LabeledProtocol>().is_err());
}

#[test]
fn srcmt_protocol_on_ham10000() {
    let ds = load(Path::new(SHARED).join("ham10000"), &opts(None, None)).unwrap();
    let p = partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 0).unwrap();
    assert_eq!(
        (p.train.len(), p.val.len(), p.test.len()),
        (7012, 1000, 2003)
    );
    assert_eq!(p.labeled.len(), 1400);
    assert_eq!(p.unlabeled.len(), 5600);
    let b = ds.benchmark.as_ref().unwrap();
    let mut rows: Vec<u32> = p.labeled.iter().map(|&i| b.row[i]).collect();
    rows.sort();
    assert_eq!(rows, (0..1400).collect::<Vec<u32>>());
    let mut rows: Vec<u32> = p.unlabeled.iter().map(|&i| b.row[i]).collect();
    rows.sort();
    assert_eq!(rows, (1400..7000).collect::<Vec<u32>>());
    // Cross-check with index.csv's split_racmt/racmt_row columns.
    let csv = std::fs::read_to_string(Path::new(SHARED).join("ham10000/index.csv")).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (cs, cr) = (
        head.iter().position(|h| *h == "split_racmt").unwrap(),
        head.iter().position(|h| *h == "racmt_row").unwrap(),
    );
    let mut n_lab = 0;
    for (i, l) in lines.enumerate() {
        let f: Vec<&str> = l.split(',').collect();
        // localization may not contain commas; the last two columns are ours.
        let (s, r) = (
            f[f.len() - (head.len() - cs)],
            f[f.len() - (head.len() - cr)],
        );
        let r: u32 = r.parse().unwrap();
        assert_eq!(b.row[i], r, "row {i}");
        assert_eq!(b.split[i].name(), s, "row {i}");
        if s == "train" && r < 1400 {
            n_lab += 1;
        }
    }
    assert_eq!(n_lab, 1400);
    // Seed does not matter for a fixed protocol.
    assert_eq!(
        p,
        partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 0).unwrap()
    );
    let p7 = partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 7).unwrap();
    assert_eq!(
        (p.labeled.clone(), p.unlabeled.clone()),
        (p7.labeled, p7.unlabeled)
    );
}

#[test]
fn raw_pneumoniamnist_counts_match_meta() {
    let ds = load(Path::new(SHARED).join("pneumoniamnist"), &opts(None, None)).unwrap();
    let m = meta("pneumoniamnist");
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (5856, 28, 28, 1)
    );
    assert_eq!(ds.classes, ["normal", "pneumonia"]);
    assert_eq!(named_counts(&ds, None), json_counts(&m["class_counts"]));
    check_official(&ds, &m, "split", ds.split.as_ref().unwrap());
    assert!(ds.benchmark.is_none());
    let e = partition(&ds, Labeled::Protocol(LabeledProtocol::Srcmt), 0).unwrap_err();
    assert!(e.to_string().contains("srcmt"), "{e}");
}

#[test]
fn npz_pneumoniamnist_matches_raw() {
    let npz_path = Path::new(SHARED).join("pneumoniamnist/pneumoniamnist.npz");
    let ds = load(&npz_path, &opts(None, None)).unwrap();
    let raw = load(Path::new(SHARED).join("pneumoniamnist"), &opts(None, None)).unwrap();
    let m = meta("pneumoniamnist");
    assert_eq!(ds.format, Format::Npz);
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (5856, 28, 28, 1)
    );
    // Class names come from the meta.json beside the file.
    assert_eq!(ds.classes, ["normal", "pneumonia"]);
    assert_eq!(named_counts(&ds, None), json_counts(&m["class_counts"]));
    check_official(&ds, &m, "split", ds.split.as_ref().unwrap());
    // val and test are in official row order in both copies: pixel- and label-identical.
    for s in [Split::Val, Split::Test] {
        let a = split_ix(ds.split.as_ref().unwrap(), s);
        let b = split_ix(raw.split.as_ref().unwrap(), s);
        assert_eq!(a.len(), b.len());
        for (&i, &j) in a.iter().zip(&b) {
            assert_eq!(ds.image(i), raw.image(j), "{s} row");
            assert_eq!(ds.labels[i], raw.labels[j]);
        }
    }
    // train is reordered in the raw copy: same multiset of (image, label).
    let mut a: Vec<(Vec<u8>, usize)> = split_ix(ds.split.as_ref().unwrap(), Split::Train)
        .into_iter()
        .map(|i| (ds.image(i).to_vec(), ds.labels[i]))
        .collect();
    let mut b: Vec<(Vec<u8>, usize)> = split_ix(raw.split.as_ref().unwrap(), Split::Train)
        .into_iter()
        .map(|i| (raw.image(i).to_vec(), raw.labels[i]))
        .collect();
    a.sort();
    b.sort();
    assert!(a == b, "train multisets differ");
}

#[test]
fn jpeg_pack_ham10000_decodes_close_to_raw() {
    let path = Path::new(SHARED).join("ham10000");
    let raw = load(&path, &opts(None, None)).unwrap();
    let ds = load(&path, &opts(Some(Format::JpegPack), Some(28))).unwrap();
    assert_eq!(ds.format, Format::JpegPack);
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (10015, 28, 28, 3)
    );
    assert_eq!(ds.labels, raw.labels);
    assert_eq!(ds.split, raw.split);
    // images.u8 is PIL's bicubic resize of the same JPEGs: ours is close, not identical.
    let mad: f64 = ds
        .images
        .iter()
        .zip(&raw.images)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / ds.images.len() as f64;
    assert!(mad < 3.0, "mean abs difference to images.u8: {mad}");
    // Each image is closest to its own raw counterpart (row order preserved).
    for i in [0usize, 1234, 10014] {
        let d = |j: usize| -> u64 {
            ds.image(i)
                .iter()
                .zip(raw.image(j))
                .map(|(&a, &b)| (a as i64 - b as i64).unsigned_abs())
                .sum()
        };
        assert!(d(i) * 3 < d((i + 1) % 10015), "image {i}");
    }
}

#[test]
fn jpeg_pack_is_autodetected_for_large_sizes() {
    let path = Path::new(SHARED).join("ham10000");
    assert_eq!(
        medssl::data::detect(&path, Some(112)).unwrap(),
        Format::JpegPack
    );
    assert_eq!(medssl::data::detect(&path, Some(28)).unwrap(), Format::Raw);
    assert_eq!(medssl::data::detect(&path, None).unwrap(), Format::Raw);
    let pn = Path::new(SHARED).join("pneumoniamnist");
    assert_eq!(medssl::data::detect(&pn, Some(64)).unwrap(), Format::Raw);
    assert_eq!(
        medssl::data::detect(&pn.join("pneumoniamnist.npz"), None).unwrap(),
        Format::Npz
    );
}

#[test]
fn raw_resized_on_request() {
    let ds = load(
        Path::new(SHARED).join("pneumoniamnist"),
        &opts(None, Some(32)),
    )
    .unwrap();
    assert_eq!(
        (ds.len(), ds.height, ds.width, ds.channels),
        (5856, 32, 32, 1)
    );
    assert_eq!(ds.images.len(), 5856 * 32 * 32);
}
