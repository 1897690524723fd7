//! Loader determinism, resumption, epoch structure; augmentation properties; CLI smoke tests.

mod data_common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use data_common::*;
use medssl::data::cli::{run_info, run_preview, DataArgs, InfoArgs, PreviewArgs};
use medssl::data::{
    channel_stats, eval_batches, partition, AugmentConfig, Augmenter, Dataset, Format, Labeled,
    LoaderConfig, LoaderMode, Normalize, Partition, Position, RaOp, SslLoader,
};
use rand::SeedableRng;

/// A synthetic in-memory dataset: `n` images of `s×s×c`, 3 classes.
fn synth(n: usize, s: usize, c: usize) -> Dataset {
    Dataset {
        source: PathBuf::from("synthetic"),
        format: Format::Raw,
        height: s,
        width: s,
        channels: c,
        images: pixels(n * s * s * c, 42),
        labels: (0..n).map(|i| i % 3).collect(),
        classes: vec!["x".into(), "y".into(), "z".into()],
        split: None,
        split_source: None,
        ids: (0..n).map(|i| format!("row {i}")).collect(),
        benchmark: None,
    }
}

fn setup(n: usize, c: usize) -> (Arc<Dataset>, Partition) {
    let ds = synth(n, 12, c);
    ds.validate().unwrap();
    let p = partition(&ds, Labeled::Ratio(0.2), 5).unwrap();
    (Arc::new(ds), p)
}

fn cfg(seed: u64, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_labeled: 4,
        batch_unlabeled: 8,
        seed,
        workers,
        prefetch: 3,
        ..Default::default()
    }
}

fn take(l: &mut SslLoader, n: usize) -> Vec<medssl::data::SslBatch> {
    (0..n).map(|_| l.next_batch()).collect()
}

#[test]
fn same_seed_same_batches_regardless_of_threads() {
    let (ds, p) = setup(300, 3);
    let mut a = SslLoader::new(ds.clone(), &p, cfg(1, 0), Position::default()).unwrap();
    let mut b = SslLoader::new(ds.clone(), &p, cfg(1, 2), Position::default()).unwrap();
    let mut c = SslLoader::new(ds.clone(), &p, cfg(1, 3), Position::default()).unwrap();
    let n = 2 * a.steps_per_epoch() as usize + 3;
    let (ba, bb, bc) = (take(&mut a, n), take(&mut b, n), take(&mut c, n));
    assert!(ba == bb, "0 vs 2 workers differ");
    assert!(ba == bc, "0 vs 3 workers differ");
    let mut d = SslLoader::new(ds, &p, cfg(2, 2), Position::default()).unwrap();
    let bd = take(&mut d, n);
    assert_ne!(ba[0].u_idx, bd[0].u_idx);
    assert_ne!(ba[0].x_lab, bd[0].x_lab);
}

#[test]
fn resumed_loader_equals_uninterrupted() {
    let (ds, p) = setup(300, 1);
    let mut full = SslLoader::new(ds.clone(), &p, cfg(3, 2), Position::default()).unwrap();
    let spe = full.steps_per_epoch();
    let all = take(&mut full, (3 * spe) as usize);
    for k in [1u64, spe - 1, spe, spe + 2, 2 * spe + 1] {
        let pos = Position {
            epoch: k / spe,
            step: k % spe,
        };
        let mut r = SslLoader::new(ds.clone(), &p, cfg(3, 1), pos).unwrap();
        assert_eq!(r.position(), pos);
        let got = take(&mut r, 4.min((3 * spe - k) as usize));
        for (j, b) in got.iter().enumerate() {
            assert!(
                *b == all[k as usize + j],
                "resume at {k}: batch {j} differs"
            );
        }
        assert_eq!(
            r.position().epoch * spe + r.position().step,
            k + got.len() as u64
        );
    }
    let e = SslLoader::new(
        ds,
        &p,
        cfg(3, 0),
        Position {
            epoch: 0,
            step: spe,
        },
    );
    assert!(e.is_err());
}

#[test]
fn epoch_structure_and_views() {
    let (ds, p) = setup(300, 3);
    let mut l = SslLoader::new(ds.clone(), &p, cfg(4, 2), Position::default()).unwrap();
    let spe = l.steps_per_epoch();
    assert_eq!(spe as usize, p.unlabeled.len() / 8);
    assert_eq!(l.num_unlabeled(), p.unlabeled.len());
    let len = 12 * 12 * 3;
    let mut lab_seen = Vec::new();
    for e in 0..2 {
        let mut slots = HashSet::new();
        for s in 0..spe {
            let b = l.next_batch();
            assert_eq!((b.epoch, b.step), (e, s));
            assert_eq!((b.channels, b.height, b.width), (3, 12, 12));
            assert_eq!(b.x_lab.len(), 4 * len);
            assert_eq!(b.u_weak.len(), 8 * len);
            assert_eq!(b.u_strong.len(), 8 * len);
            for (j, &i) in b.lab_idx.iter().enumerate() {
                assert!(p.labeled.contains(&i));
                assert_eq!(b.y_lab[j], ds.labels[i]);
            }
            for (j, &k) in b.u_slot.iter().enumerate() {
                assert_eq!(p.unlabeled[k], b.u_idx[j]);
                assert_eq!(b.u_label[j], ds.labels[b.u_idx[j]]);
                assert!(slots.insert(k), "slot {k} twice in epoch {e}");
            }
            // weak and strong are views of the same images but not the same tensors
            assert_ne!(b.u_weak, b.u_strong);
            lab_seen.extend_from_slice(&b.lab_idx);
            assert!(b
                .x_lab
                .iter()
                .chain(&b.u_weak)
                .chain(&b.u_strong)
                .all(|v| v.is_finite()));
        }
        assert_eq!(slots.len(), spe as usize * 8);
    }
    // Labelled stream: each pass is a permutation of the labelled set.
    let nl = p.labeled.len();
    for pass in lab_seen.chunks_exact(nl) {
        let mut v = pass.to_vec();
        v.sort();
        assert_eq!(v, p.labeled);
    }
    assert_ne!(lab_seen[..nl], lab_seen[nl..2 * nl]);
}

#[test]
fn weak_views_of_unlabelled_match_image_content() {
    // With flips/translation only, each weak view is a pixel rearrangement of its source image.
    let (ds, p) = setup(120, 1);
    let mut l = SslLoader::new(ds.clone(), &p, cfg(5, 0), Position::default()).unwrap();
    let b = l.next_batch();
    let norm = l.normalize().clone();
    let len = 144;
    for j in 0..8 {
        let v = norm.invert(&b.u_weak[j * len..(j + 1) * len]);
        let src = ds.image(b.u_idx[j]);
        let set: HashSet<u8> = src.iter().copied().collect();
        assert!(
            v.iter().all(|x| set.contains(x)),
            "weak view {j} has foreign pixels"
        );
    }
}

#[test]
fn supervised_mode() {
    let (ds, p) = setup(300, 3);
    let c = LoaderConfig {
        mode: LoaderMode::Supervised,
        ..cfg(6, 2)
    };
    let mut l = SslLoader::new(ds.clone(), &p, c.clone(), Position::default()).unwrap();
    let spe = l.steps_per_epoch();
    assert_eq!(spe as usize, p.labeled.len() / 4);
    let mut seen = HashSet::new();
    for _ in 0..spe {
        let b = l.next_batch();
        assert!(b.u_weak.is_empty() && b.u_strong.is_empty() && b.u_idx.is_empty());
        for &i in &b.lab_idx {
            assert!(seen.insert(i), "labelled image twice in one epoch");
        }
    }
    let next = l.next_batch();
    let mut r = SslLoader::new(ds, &p, c, Position { epoch: 1, step: 0 }).unwrap();
    assert!(r.next_batch() == next);
}

#[test]
fn eval_batches_are_plain_and_complete() {
    let (ds, p) = setup(100, 3);
    let norm = Normalize::from_dataset(&ds, &p.train);
    let it = eval_batches(&ds, &p.test, &norm, 7);
    assert_eq!(it.num_batches(), p.test.len().div_ceil(7));
    let batches: Vec<_> = it.collect();
    let idx: Vec<usize> = batches.iter().flat_map(|b| b.idx.clone()).collect();
    assert_eq!(idx, p.test);
    let b = &batches[0];
    let len = 12 * 12 * 3;
    assert_eq!(norm.invert(&b.x[..len]), ds.image(b.idx[0]));
    assert_eq!(b.y[0], ds.labels[b.idx[0]]);
    // CHW layout: channel 1 of pixel (0, 1).
    let v = (ds.image(b.idx[0])[3 + 1] as f32 / 255.0 - norm.mean[1]) / norm.std[1];
    assert!((b.x[144 + 1] - v).abs() < 1e-6);
}

#[test]
fn channel_stats_match_definition() {
    let ds = synth(10, 4, 3);
    let ix: Vec<usize> = (0..5).collect();
    let (m, s) = channel_stats(&ds, &ix);
    for c in 0..3 {
        let vals: Vec<f64> = ix
            .iter()
            .flat_map(|&i| ds.image(i).chunks(3).map(move |p| p[c] as f64 / 255.0))
            .collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!((m[c] as f64 - mean).abs() < 1e-6);
        assert!((s[c] as f64 - var.sqrt()).abs() < 1e-6);
    }
    // Real data: HAM10000 train mean/std close to meta.json's (whole-set) values.
    let ham = medssl::data::load(Path::new(SHARED).join("ham10000"), &Default::default()).unwrap();
    let (m, s) = channel_stats(&ham, &(0..ham.len()).collect::<Vec<_>>());
    for (c, (want_m, want_s)) in [(0.7635, 0.1389), (0.5462, 0.15), (0.5706, 0.1666)]
        .iter()
        .enumerate()
    {
        assert!((m[c] - want_m).abs() < 2e-3, "mean {c}: {}", m[c]);
        assert!((s[c] - want_s).abs() < 2e-3, "std {c}: {}", s[c]);
    }
}

#[test]
fn augment_ops_behave() {
    for c in [1usize, 3] {
        let (h, w) = (16, 16);
        let norm = Normalize::new(vec![0.5; c], vec![0.25; c]);
        let aug = Augmenter::new(h, w, c, AugmentConfig::default(), norm.clone());
        let src = pixels(h * w * c, 11);
        for op in RaOp::ALL {
            for m in [0.0f32, 0.5, 0.99] {
                let mut img = src.clone();
                aug.apply_op(&mut img, op, m, 1.0);
                assert_eq!(img.len(), src.len());
                if matches!(op, RaOp::Identity)
                    || (m == 0.0
                        && matches!(
                            op,
                            RaOp::Brightness
                                | RaOp::Contrast
                                | RaOp::Sharpness
                                | RaOp::Posterize
                                | RaOp::Solarize
                                | RaOp::Rotate
                                | RaOp::ShearX
                                | RaOp::ShearY
                                | RaOp::TranslateX
                                | RaOp::TranslateY
                                | RaOp::Color
                        ))
                {
                    assert_eq!(img, src, "{op:?} m={m} c={c} should be identity");
                }
            }
        }
        // Solarize at full magnitude inverts (threshold ~0).
        let mut img = src.clone();
        aug.apply_op(&mut img, RaOp::Solarize, 0.999, 1.0);
        assert!(img.iter().zip(&src).all(|(a, b)| *a == 255 - *b));
        // Posterize to 4 bits.
        let mut img = src.clone();
        aug.apply_op(&mut img, RaOp::Posterize, 0.99, 1.0);
        assert!(img.iter().all(|v| v & 0x0f == 0));
        // AutoContrast stretches to the full range.
        let dim: Vec<u8> = src.iter().map(|v| 50 + v / 4).collect();
        let mut img = dim.clone();
        aug.apply_op(&mut img, RaOp::AutoContrast, 0.3, 1.0);
        assert_eq!(img.iter().min(), Some(&0));
        assert_eq!(img.iter().max(), Some(&255));
        // TranslateX by +30 %: the left columns are fill.
        let mut img = src.clone();
        aug.apply_op(&mut img, RaOp::TranslateX, 0.99, 1.0);
        assert!(img[..c].iter().all(|&v| v == 128));
        // Strong views: deterministic in the generator, different across seeds, cutout present.
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut r3 = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let a = aug.strong_u8(&src, &mut r1);
        assert_eq!(a, aug.strong_u8(&src, &mut r2));
        assert_ne!(a, aug.strong_u8(&src, &mut r3));
        let fills = a.iter().filter(|&&v| v == 128).count();
        assert!(fills >= 4 * 4 * c, "cutout too small: {fills}");
        // Weak f32 path equals u8 path + normalisation.
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut out = vec![0f32; src.len()];
        aug.weak(&src, &mut r1, &mut out);
        let mut want = vec![0f32; src.len()];
        norm.apply(&aug.weak_u8(&src, &mut r2), &mut want);
        assert_eq!(out, want);
        // Optional rotation keeps sizes and stays deterministic.
        let rot = Augmenter::new(
            h,
            w,
            c,
            AugmentConfig {
                rotate_deg: 10.0,
                ..Default::default()
            },
            norm.clone(),
        );
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert_eq!(rot.weak_u8(&src, &mut r1), rot.weak_u8(&src, &mut r2));
    }
}

#[test]
fn translation_is_bounded_and_flips_happen() {
    // A single bright pixel in the centre moves at most 12.5 % (2 px of 16) per axis, after
    // mirroring; all flip combinations occur.
    let (h, w) = (16usize, 16usize);
    let norm = Normalize::new(vec![0.0], vec![1.0]);
    let cfg = AugmentConfig {
        flip_h: false,
        flip_v: false,
        ..Default::default()
    };
    let aug = Augmenter::new(h, w, 1, cfg, norm.clone());
    let mut src = vec![0u8; h * w];
    src[5 * w + 6] = 255;
    let mut shifts = HashSet::new();
    for s in 0..400 {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(s);
        let v = aug.weak_u8(&src, &mut r);
        let p = v.iter().position(|&x| x == 255).unwrap();
        let (dy, dx) = ((p / w) as i64 - 5, (p % w) as i64 - 6);
        assert!(dy.abs() <= 2 && dx.abs() <= 2, "shift {dy},{dx}");
        shifts.insert((dy, dx));
    }
    assert_eq!(shifts.len(), 25);
    let aug = Augmenter::new(
        h,
        w,
        1,
        AugmentConfig {
            translate: 0.0,
            ..Default::default()
        },
        norm,
    );
    let mut flips = HashSet::new();
    for s in 0..100 {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(s);
        flips.insert(
            aug.weak_u8(&src, &mut r)
                .iter()
                .position(|&x| x == 255)
                .unwrap(),
        );
    }
    let want: HashSet<usize> = [5 * w + 6, 5 * w + 9, 10 * w + 6, 10 * w + 9]
        .into_iter()
        .collect();
    assert_eq!(flips, want);
}

fn data_args(path: &Path) -> DataArgs {
    DataArgs {
        path: path.to_path_buf(),
        format: None,
        image_size: None,
        labeled_ratio: None,
        labeled_protocol: None,
        seed: 0,
        classes: None,
    }
}

#[test]
fn cli_info_and_preview_smoke() {
    let d = tmpdir("cli");
    write_folder(&d.join("data"), &["a", "b"], 10, 3);
    let run = d.join("run");
    run_info(&InfoArgs {
        data: data_args(&d.join("data")),
        json: true,
        write_split: Some(run.clone()),
    })
    .unwrap();
    assert!(run.join("labeled.txt").is_file() && run.join("partition.json").is_file());
    run_info(&InfoArgs {
        data: data_args(&d.join("data")),
        json: false,
        write_split: None,
    })
    .unwrap();
    let out = d.join("preview.png");
    let pn = Path::new(SHARED).join("pneumoniamnist");
    run_preview(&PreviewArgs {
        data: data_args(&pn),
        out: out.clone(),
        rows: 4,
        weak: 2,
        strong: 3,
        split: "train".into(),
        rotate_deg: 0.0,
    })
    .unwrap();
    let img = image::open(&out).unwrap();
    // 28 px upscaled 4x = 112 px cells, 6 columns, 4 rows, 4 px gaps.
    assert_eq!((img.width(), img.height()), (6 * 116 + 8, 4 * 116 + 4));
    // --labeled-ratio with --labeled-protocol is refused.
    let mut a = data_args(&pn);
    a.labeled_ratio = Some(0.1);
    a.labeled_protocol = Some(medssl::data::LabeledProtocol::Srcmt);
    assert!(run_info(&InfoArgs {
        data: a,
        json: true,
        write_split: None
    })
    .is_err());
}
