//! Metrics (SPEC §3) against hand-computed values and tiny independent implementations, and the
//! PNG plots.

use approx::assert_abs_diff_eq;
use medssl::train::metrics::{compute, confusion_ascii, roc_auc, summary_line, Metrics};
use medssl::train::plot::{plot_confusion, plot_curves};

const EPS: f64 = 1e-12;

/// Two-class probability rows from class-1 scores.
fn binary_probs(s: &[f32]) -> Vec<f32> {
    s.iter().flat_map(|&p| [1.0 - p, p]).collect()
}

/// Independent AUC: fraction of (positive, negative) pairs ranked correctly, ties count ½.
fn pairwise_auc(scores: &[f64], pos: &[bool]) -> Option<f64> {
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..scores.len() {
        for j in 0..scores.len() {
            if pos[i] && !pos[j] {
                den += 1.0;
                if scores[i] > scores[j] {
                    num += 1.0;
                } else if scores[i] == scores[j] {
                    num += 0.5;
                }
            }
        }
    }
    (den > 0.0).then(|| num / den)
}

/// Tiny deterministic generator (LCG) for the randomised cross-checks.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

#[test]
fn sklearn_doc_example_auc() {
    // roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    let m = compute(&binary_probs(&[0.1, 0.4, 0.35, 0.8]), &[0, 0, 1, 1], 2, 0.5).unwrap();
    assert_abs_diff_eq!(m.auc[1].unwrap(), 0.75, epsilon = 1e-6);
    // Class 0 scores are 1 - s: the same ordering reversed against the reversed labels.
    assert_abs_diff_eq!(m.auc[0].unwrap(), 0.75, epsilon = 1e-6);
    assert_abs_diff_eq!(m.macro_auc, 0.75, epsilon = 1e-6);
    // argmax: 0,0,0,1 -> 3/4 correct.
    assert_eq!(m.confusion, vec![vec![2, 0], vec![1, 1]]);
    assert_abs_diff_eq!(m.accuracy, 0.75, epsilon = EPS);
}

#[test]
fn auc_with_tied_scores() {
    // positives {0.5, 0.9, 0.2}, negatives {0.2, 0.5}.
    // Pairs: 0.5>0.2 (1), 0.5=0.5 (½), 0.9 (1+1), 0.2=0.2 (½), 0.2<0.5 (0) -> 4/6.
    let scores = [0.2, 0.5, 0.5, 0.9, 0.2];
    let pos = [false, true, false, true, true];
    assert_abs_diff_eq!(roc_auc(&scores, &pos).unwrap(), 4.0 / 6.0, epsilon = EPS);
    // All scores equal -> 0.5.
    assert_abs_diff_eq!(
        roc_auc(&[0.3; 4], &[true, false, true, false]).unwrap(),
        0.5,
        epsilon = EPS
    );
    // Through `compute` (f32 path) as well.
    let s32: Vec<f32> = scores.iter().map(|&v| v as f32).collect();
    let labels: Vec<usize> = pos.iter().map(|&p| p as usize).collect();
    let m = compute(&binary_probs(&s32), &labels, 2, 0.18).unwrap();
    assert_abs_diff_eq!(m.auc[1].unwrap(), 4.0 / 6.0, epsilon = 1e-9);
    // Undefined without positives or negatives.
    assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    assert_eq!(roc_auc(&[0.1, 0.2], &[false, false]), None);
}

#[test]
fn perfect_and_inverted_classifiers() {
    let probs = [
        0.8, 0.1, 0.1, //
        0.1, 0.7, 0.2, //
        0.2, 0.2, 0.6, //
        0.6, 0.3, 0.1, //
    ];
    let labels = [0, 1, 2, 0];
    let m = compute(&probs, &labels, 3, 0.18).unwrap();
    assert_eq!(m.n, 4);
    assert_abs_diff_eq!(m.accuracy, 1.0, epsilon = EPS);
    assert_abs_diff_eq!(m.balanced_accuracy, 1.0, epsilon = EPS);
    assert_abs_diff_eq!(m.macro_f1, 1.0, epsilon = EPS);
    assert!(m.auc.iter().all(|a| (a.unwrap() - 1.0).abs() < EPS));
    assert_abs_diff_eq!(m.macro_auc, 1.0, epsilon = EPS);
    assert_eq!(
        m.confusion,
        vec![vec![2, 0, 0], vec![0, 1, 0], vec![0, 0, 1]]
    );
    assert_eq!(m.loss, None);

    // Inverted binary classifier: every positive scored below every negative.
    let m = compute(&binary_probs(&[0.9, 0.8, 0.2, 0.1]), &[0, 0, 1, 1], 2, 0.5).unwrap();
    assert_abs_diff_eq!(m.auc[1].unwrap(), 0.0, epsilon = EPS);
    assert_abs_diff_eq!(m.auc[0].unwrap(), 0.0, epsilon = EPS);
    assert_abs_diff_eq!(m.accuracy, 0.0, epsilon = EPS);
    assert_abs_diff_eq!(m.balanced_accuracy, 0.0, epsilon = EPS);
    assert_abs_diff_eq!(m.macro_f1, 0.0, epsilon = EPS);
    assert_eq!(m.confusion, vec![vec![0, 2], vec![2, 0]]);
}

#[test]
fn argmax_ties_go_to_lowest_index() {
    let probs = [
        0.4,
        0.4,
        0.2,
        0.3,
        0.35,
        0.35,
        1.0 / 3.0,
        1.0 / 3.0,
        1.0 / 3.0,
    ];
    let m = compute(&probs, &[1, 2, 2], 3, 0.18).unwrap();
    // Predictions: 0, 1, 0.
    assert_eq!(
        m.confusion,
        vec![vec![0, 0, 0], vec![1, 0, 0], vec![1, 1, 0]]
    );
    assert_abs_diff_eq!(m.accuracy, 0.0, epsilon = EPS);
}

#[test]
fn class_absent_from_labels() {
    // 3 classes, label 2 never occurs, but class 2 is predicted once.
    let probs = [
        0.7, 0.2, 0.1, // y0 -> 0
        0.5, 0.4, 0.1, // y0 -> 0
        0.2, 0.6, 0.2, // y1 -> 1
        0.2, 0.3, 0.5, // y1 -> 2
        0.6, 0.3, 0.1, // y1 -> 0
    ];
    let labels = [0, 0, 1, 1, 1];
    let m = compute(&probs, &labels, 3, 0.18).unwrap();
    assert_eq!(
        m.confusion,
        vec![vec![2, 0, 0], vec![1, 1, 1], vec![0, 0, 0]]
    );
    assert_abs_diff_eq!(m.accuracy, 3.0 / 5.0, epsilon = EPS);
    // Recall: class 0 = 1, class 1 = 1/3; class 2 absent from labels -> excluded.
    assert_abs_diff_eq!(m.balanced_accuracy, (1.0 + 1.0 / 3.0) / 2.0, epsilon = EPS);
    // F1: class 0 P=2/3 R=1 -> 0.8; class 1 P=1 R=1/3 -> 0.5; class 2 predicted, P=0 -> 0.
    // Class 2 is in y_true ∪ y_pred -> averaged over 3 classes.
    assert_abs_diff_eq!(m.macro_f1, (0.8 + 0.5 + 0.0) / 3.0, epsilon = EPS);
    // AUC class 2 undefined (no positives).
    assert_eq!(m.auc[2], None);
    // Class 0 scores: pos {0.7, 0.5}, neg {0.2, 0.2, 0.6}: 0.7 beats all (3), 0.5 beats 2 -> 5/6.
    assert_abs_diff_eq!(m.auc[0].unwrap(), 5.0 / 6.0, epsilon = 1e-7);
    // Class 1 scores: pos {0.6, 0.3, 0.3}, neg {0.2, 0.4}: 0.6 -> 2, 0.3 -> 1, 0.3 -> 1 -> 4/6.
    assert_abs_diff_eq!(m.auc[1].unwrap(), 4.0 / 6.0, epsilon = 1e-7);
    assert_abs_diff_eq!(m.macro_auc, (5.0 / 6.0 + 4.0 / 6.0) / 2.0, epsilon = 1e-7);

    // When the absent class is also never predicted it drops out of macro-F1.
    let probs = [0.7, 0.2, 0.1, 0.2, 0.6, 0.2];
    let m = compute(&probs, &[0, 1], 3, 0.18).unwrap();
    assert_abs_diff_eq!(m.macro_f1, 1.0, epsilon = EPS);
    assert_abs_diff_eq!(m.balanced_accuracy, 1.0, epsilon = EPS);
}

#[test]
fn srcmt_hand_computed() {
    let probs = [
        0.7, 0.2, 0.1, // y0
        0.5, 0.4, 0.1, // y0
        0.2, 0.6, 0.2, // y1
        0.2, 0.3, 0.5, // y1
        0.6, 0.3, 0.1, // y1
    ];
    let labels = [0, 0, 1, 1, 1];
    let m = compute(&probs, &labels, 3, 0.18).unwrap();
    // Class 0: pred >= 0.18 -> [1,1,1,1,1]; truth [1,1,0,0,0]: TP2 FP3 TN0 FN0.
    //   acc 2/5, sens 1, spec 0, prec 2/5, F1 = 2*0.4/(1.4) = 4/7.
    // Class 1: pred [1,1,1,1,1]; truth [0,0,1,1,1]: TP3 FP2 TN0 FN0.
    //   acc 3/5, sens 1, spec 0, prec 3/5, F1 = 2*0.6/1.6 = 0.75.
    // Class 2: pred [0,0,1,1,0]; truth all 0: TP0 FP2 TN3 FN0.
    //   acc 3/5, sens 0 (no positives), spec 3/5, prec 0, F1 0.
    let s = &m.srcmt;
    assert_eq!(s.threshold, 0.18);
    assert_abs_diff_eq!(s.accuracy, (0.4 + 0.6 + 0.6) / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.sensitivity, 2.0 / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.specificity, 0.6 / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.precision, (0.4 + 0.6) / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.f1, (4.0 / 7.0 + 0.75) / 3.0, epsilon = EPS);

    // Threshold 0.55: class 0 pred [1,0,0,0,1] TP1 FP1 TN2 FN1; class 1 pred [0,0,1,0,0]
    // TP1 FP0 TN2 FN2; class 2 none predicted: TN5.
    let m = compute(&probs, &labels, 3, 0.55).unwrap();
    let s = &m.srcmt;
    assert_abs_diff_eq!(
        s.accuracy,
        (3.0 / 5.0 + 3.0 / 5.0 + 1.0) / 3.0,
        epsilon = EPS
    );
    assert_abs_diff_eq!(s.sensitivity, (0.5 + 1.0 / 3.0 + 0.0) / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.specificity, (2.0 / 3.0 + 1.0 + 1.0) / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.precision, (0.5 + 1.0 + 0.0) / 3.0, epsilon = EPS);
    assert_abs_diff_eq!(s.f1, (0.5 + 0.5 + 0.0) / 3.0, epsilon = EPS);
}

/// Independent brute-force implementation of every metric, compared on random data with ties.
#[test]
fn randomised_cross_check() {
    let mut rng = Lcg(12345);
    for trial in 0..200 {
        let classes = 2 + rng.below(5);
        let n = 1 + rng.below(40);
        let labels: Vec<usize> = (0..n).map(|_| rng.below(classes as u64)).collect();
        // Coarsely quantised scores (ties are common), normalised per row.
        let mut probs = vec![0f32; n * classes];
        for i in 0..n {
            let raw: Vec<f32> = (0..classes).map(|_| rng.below(5) as f32 + 0.5).collect();
            let sum: f32 = raw.iter().sum();
            for c in 0..classes {
                probs[i * classes + c] = raw[c] / sum;
            }
        }
        let thr = [0.18, 0.25, 0.5][trial % 3];
        let m = compute(&probs, &labels, classes, thr).unwrap();

        let pred: Vec<usize> = (0..n)
            .map(|i| {
                let row = &probs[i * classes..(i + 1) * classes];
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter().position(|&v| v == mx).unwrap()
            })
            .collect();
        let acc = (0..n).filter(|&i| pred[i] == labels[i]).count() as f64 / n as f64;
        assert_abs_diff_eq!(m.accuracy, acc, epsilon = 1e-12);

        let (mut rec_sum, mut rec_n, mut f1_sum, mut f1_n) = (0.0, 0, 0.0, 0);
        let (mut auc_sum, mut auc_n) = (0.0, 0);
        for c in 0..classes {
            let tp = (0..n).filter(|&i| pred[i] == c && labels[i] == c).count() as f64;
            let t = (0..n).filter(|&i| labels[i] == c).count() as f64;
            let p = (0..n).filter(|&i| pred[i] == c).count() as f64;
            if t > 0.0 {
                rec_sum += tp / t;
                rec_n += 1;
            }
            if t > 0.0 || p > 0.0 {
                // F1 = 2TP / (T + P).
                f1_sum += 2.0 * tp / (t + p);
                f1_n += 1;
            }
            let sc: Vec<f64> = (0..n).map(|i| probs[i * classes + c] as f64).collect();
            let pos: Vec<bool> = labels.iter().map(|&y| y == c).collect();
            let want = pairwise_auc(&sc, &pos);
            match (m.auc[c], want) {
                (Some(a), Some(b)) => {
                    assert_abs_diff_eq!(a, b, epsilon = 1e-12);
                    auc_sum += b;
                    auc_n += 1;
                }
                (None, None) => {}
                other => panic!("trial {trial} class {c}: AUC mismatch {other:?}"),
            }
            for tr in 0..classes {
                let cnt = (0..n).filter(|&i| labels[i] == tr && pred[i] == c).count();
                assert_eq!(m.confusion[tr][c], cnt);
            }
        }
        assert_abs_diff_eq!(m.balanced_accuracy, rec_sum / rec_n as f64, epsilon = 1e-12);
        assert_abs_diff_eq!(m.macro_f1, f1_sum / f1_n as f64, epsilon = 1e-12);
        if auc_n > 0 {
            assert_abs_diff_eq!(m.macro_auc, auc_sum / auc_n as f64, epsilon = 1e-12);
        } else {
            assert!(m.macro_auc.is_nan());
        }
    }
}

#[test]
fn input_validation() {
    let e = compute(&[0.5, 0.5, 0.5], &[0, 1], 2, 0.18)
        .unwrap_err()
        .to_string();
    assert!(e.contains("probs has 3 values"), "{e}");
    let e = compute(&[0.5, 0.5], &[2], 2, 0.18).unwrap_err().to_string();
    assert!(e.contains("label 2 of sample 0"), "{e}");
    let e = compute(&[0.5, 0.5, 0.5, f32::NAN], &[0, 1], 2, 0.18)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sample 1 class 1") && e.contains("not finite"),
        "{e}"
    );
    let e = compute(&[0.5, f32::INFINITY], &[0], 2, 0.18)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    assert!(compute(&[], &[], 2, 0.18)
        .unwrap_err()
        .to_string()
        .contains("no samples"));
    assert!(compute(&[], &[0], 0, 0.18).is_err());
    assert!(compute(&[0.5, 0.5], &[0], 2, f64::NAN).is_err());
}

#[test]
fn single_class_labels_give_nan_macro_auc_and_json_roundtrip() {
    let m = compute(&binary_probs(&[0.2, 0.7]), &[1, 1], 2, 0.18).unwrap();
    assert_eq!(m.auc, vec![None, None]);
    assert!(m.macro_auc.is_nan());
    let js = serde_json::to_string(&m).unwrap();
    assert!(js.contains("\"macro_auc\":null"), "{js}");
    let back: Metrics = serde_json::from_str(&js).unwrap();
    assert!(back.macro_auc.is_nan());
    assert_eq!(back.confusion, m.confusion);

    let mut m = compute(&binary_probs(&[0.2, 0.7]), &[0, 1], 2, 0.18).unwrap();
    m.loss = Some(0.25);
    let back: Metrics = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn text_reports() {
    let probs = [
        0.7, 0.2, 0.1, 0.5, 0.4, 0.1, 0.2, 0.6, 0.2, 0.2, 0.3, 0.5, 0.6, 0.3, 0.1,
    ];
    let mut m = compute(&probs, &[0, 0, 1, 1, 1], 3, 0.18).unwrap();
    let names: Vec<String> = ["MEL", "NV", "BCC-long-name"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = confusion_ascii(&m, &names);
    print!("{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].contains("BCC-long-name") && lines[0].contains("recall"));
    // All rows aligned to the same width.
    assert!(
        lines
            .iter()
            .all(|l| l.chars().count() == lines[0].chars().count()),
        "{t}"
    );
    assert!(lines[1].starts_with("MEL") && lines[1].contains("1.0000"));
    assert!(lines[2].contains("0.3333"));
    assert!(lines[3].trim_end().ends_with('-')); // class absent: no recall, no AUC
                                                 // Missing names fall back to indices.
    assert!(confusion_ascii(&m, &[]).contains("c2"));

    m.loss = Some(1.5);
    let s = summary_line(&m);
    println!("{s}");
    assert!(!s.contains('\n'));
    for key in [
        "acc=0.6000",
        "bal-acc=0.6667",
        "macro-F1=0.4333",
        "macro-AUC=0.7500",
        "SRC-MT",
        "loss=1.5000",
    ] {
        assert!(s.contains(key), "{key} missing in {s}");
    }
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("medssl-metrics-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn synthetic_records(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|e| {
            let t = e as f64;
            let ramp = (t / 8.0).min(1.0);
            let mut r = serde_json::json!({
                "epoch": e + 1,
                "train": {
                    "loss": 2.0 * (-t / 6.0).exp() + 0.3,
                    "loss_sup": 1.6 * (-t / 5.0).exp() + 0.2,
                    "loss_cons": 0.05 + 0.02 * t.sin().abs(),
                    "loss_pgc": 0.3 * (-t / 10.0).exp(),
                    "lambda_cons": ramp,
                    "lambda_pgc": 0.5 * ramp,
                    "mean_weight": 0.4 + 0.4 * ramp,
                    "lr": 1e-4 * (1.0 + (std::f64::consts::PI * t / n as f64).cos()) / 2.0,
                },
                "val_teacher": {"accuracy": 0.6 + 0.3 * ramp, "macro_auc": 0.7 + 0.22 * ramp, "balanced_accuracy": 0.5 + 0.2 * ramp},
                "val_student": {"accuracy": 0.58 + 0.3 * ramp, "macro_auc": 0.68 + 0.22 * ramp, "balanced_accuracy": 0.48 + 0.2 * ramp},
            });
            if e == 3 {
                // Missing fields are skipped.
                r["train"].as_object_mut().unwrap().remove("loss_pgc");
                r.as_object_mut().unwrap().remove("val_student");
            }
            r
        })
        .collect()
}

#[test]
fn plot_curves_writes_png() {
    let dir = tmpdir("curves");
    let path = dir.join("curves.png");
    plot_curves(&path, &synthetic_records(20)).unwrap();
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (1200, 800));
    // No temporary file left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // Not blank: some dark (text / axis) pixels and some coloured ones.
    let rgb = img.to_rgb8();
    assert!(rgb.pixels().any(|p| p.0 == [0, 0, 0]));
    assert!(rgb.pixels().any(|p| p.0 == [31, 119, 180]));

    // Overwrite in place, with degenerate inputs: one record, empty records, no fields.
    plot_curves(&path, &synthetic_records(1)).unwrap();
    plot_curves(&path, &[]).unwrap();
    plot_curves(
        &path,
        &[serde_json::json!({"epoch": 1}), serde_json::json!("junk")],
    )
    .unwrap();
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (1200, 800));
    if std::env::var_os("MEDSSL_KEEP_PLOTS").is_some() {
        plot_curves(&dir.join("keep.png"), &synthetic_records(20)).unwrap();
        eprintln!("kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn plot_confusion_writes_png() {
    let dir = tmpdir("confusion");
    let path = dir.join("confusion.png");
    let mut rng = Lcg(7);
    let classes = 7;
    let n = 500;
    let labels: Vec<usize> = (0..n).map(|_| rng.below(classes as u64)).collect();
    let mut probs = vec![0.05f32; n * classes];
    for (i, &y) in labels.iter().enumerate() {
        let p = if rng.below(4) == 0 {
            rng.below(classes as u64)
        } else {
            y
        };
        probs[i * classes + p] = 0.7;
    }
    let m = compute(&probs, &labels, classes, 0.18).unwrap();
    let names: Vec<String> = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    plot_confusion(&path, &m, &names).unwrap();
    let img = image::open(&path).unwrap();
    assert!(
        img.width() >= 400 && img.height() >= 400,
        "{}x{}",
        img.width(),
        img.height()
    );
    // Without names.
    plot_confusion(&path, &m, &[]).unwrap();
    image::open(&path).unwrap();
    if std::env::var_os("MEDSSL_KEEP_PLOTS").is_some() {
        plot_confusion(&dir.join("keep.png"), &m, &names).unwrap();
        eprintln!("kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
