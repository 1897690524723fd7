//! Classification metrics (SPEC §3): top-1 accuracy, balanced accuracy, macro-F1, per-class
//! one-vs-rest ROC AUC and macro-AUC, the confusion matrix, and the ISIC2018 SSL-literature
//! thresholded convention (SRC-MT).
//!
//! Conventions (chosen to match scikit-learn where it has an equivalent):
//! * the predicted class is the arg-max of a row; ties go to the lowest class index;
//! * balanced accuracy is the mean recall over the classes present in the labels
//!   (`sklearn.metrics.balanced_accuracy_score`);
//! * macro-F1 averages the per-class F1 over the classes that appear in the labels **or** the
//!   predictions (`f1_score(average='macro')` averages over `y_true ∪ y_pred`); a class's F1 is 0
//!   when its precision + recall is 0;
//! * per-class AUC is the one-vs-rest ROC AUC computed as the Mann–Whitney U statistic with
//!   average ranks for tied scores (equal to `roc_auc_score`); it is `None` when the class has no
//!   positive or no negative sample; macro-AUC is the mean over the classes where it is defined
//!   (NaN when none is; NaN is stored as `null` in JSON);
//! * SRC-MT: per class `c`, predict positive when `prob[:, c] >= threshold` and compare with
//!   `label == c`; accuracy, sensitivity (recall), specificity, precision and F1 are computed per
//!   class, each ratio being 0 when its denominator is 0, and then averaged over all classes.

use crate::bail;
use crate::error::Result;

/// The SRC-MT default binarisation threshold.
pub const SRCMT_THRESHOLD: f64 = 0.18;

/// Class-averaged one-vs-rest metrics at a fixed probability threshold (SRC-MT convention).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SrcmtMetrics {
    pub threshold: f64,
    pub accuracy: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub precision: f64,
    pub f1: f64,
}

/// All metrics of one evaluation (one split, one model).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Number of samples.
    pub n: usize,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Mean recall over the classes present in the labels.
    pub balanced_accuracy: f64,
    /// Mean F1 over the classes present in the labels or the predictions.
    pub macro_f1: f64,
    /// One-vs-rest ROC AUC per class; `None` when a class has no positives or no negatives.
    pub auc: Vec<Option<f64>>,
    /// Mean of the defined per-class AUCs (NaN when none is defined; `null` in JSON).
    #[serde(with = "nan_as_null")]
    pub macro_auc: f64,
    /// Confusion matrix, `confusion[true][pred]`.
    pub confusion: Vec<Vec<usize>>,
    /// The thresholded SRC-MT convention.
    pub srcmt: SrcmtMetrics,
    /// Mean loss over the split, when the caller measured one (`compute` leaves it `None`).
    pub loss: Option<f64>,
}

/// Serialises a non-finite f64 as `null` and reads `null` back as NaN (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn f1_of(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// Index of the largest value; ties go to the lowest index.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] {
            best = j;
        }
    }
    best
}

/// One-vs-rest ROC AUC of `scores` against `positive` (Mann–Whitney U with average ranks).
/// `None` when there are no positives or no negatives.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    debug_assert_eq!(scores.len(), positive.len());
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        // Samples order[i..j] share ranks i+1..=j; their average is (i + 1 + j) / 2.
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let pos_in_group = order[i..j].iter().filter(|&&k| positive[k]).count();
        rank_sum_pos += avg_rank * pos_in_group as f64;
        i = j;
    }
    let (np, nn) = (n_pos as f64, n_neg as f64);
    let u = rank_sum_pos - np * (np + 1.0) / 2.0;
    Some(u / (np * nn))
}

/// Computes every metric from `probs` (N×C row-major softmax probabilities) and `labels`.
/// `threshold` is the SRC-MT binarisation threshold ([`SRCMT_THRESHOLD`] by default).
pub fn compute(probs: &[f32], labels: &[usize], classes: usize, threshold: f64) -> Result<Metrics> {
    if classes == 0 {
        bail!("metrics: classes must be at least 1");
    }
    let n = labels.len();
    if n == 0 {
        bail!("metrics: no samples (labels is empty)");
    }
    if probs.len() != n * classes {
        bail!(
            "metrics: probs has {} values but labels has {n} samples × {classes} classes = {}",
            probs.len(),
            n * classes
        );
    }
    if !threshold.is_finite() {
        bail!("metrics: SRC-MT threshold must be finite, got {threshold}");
    }
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
        bail!("metrics: label {y} of sample {i} is out of range (classes = {classes})");
    }
    if let Some((k, &p)) = probs.iter().enumerate().find(|(_, p)| !p.is_finite()) {
        bail!(
            "metrics: probability of sample {} class {} is not finite ({p})",
            k / classes,
            k % classes
        );
    }

    // Confusion matrix and top-1 accuracy.
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (row, &y) in probs.chunks_exact(classes).zip(labels) {
        confusion[y][argmax(row)] += 1;
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let accuracy = correct as f64 / n as f64;

    let support: Vec<usize> = confusion.iter().map(|r| r.iter().sum()).collect();
    let predicted: Vec<usize> = (0..classes)
        .map(|c| confusion.iter().map(|r| r[c]).sum())
        .collect();

    // Balanced accuracy: mean recall over classes present in the labels.
    let present: Vec<usize> = (0..classes).filter(|&c| support[c] > 0).collect();
    let balanced_accuracy = present
        .iter()
        .map(|&c| ratio(confusion[c][c], support[c]))
        .sum::<f64>()
        / present.len() as f64;

    // Macro-F1 over classes in labels ∪ predictions.
    let f1_classes: Vec<usize> = (0..classes)
        .filter(|&c| support[c] > 0 || predicted[c] > 0)
        .collect();
    let macro_f1 = f1_classes
        .iter()
        .map(|&c| {
            let tp = confusion[c][c];
            f1_of(ratio(tp, predicted[c]), ratio(tp, support[c]))
        })
        .sum::<f64>()
        / f1_classes.len() as f64;

    // Per-class one-vs-rest AUC.
    let mut scores = vec![0.0f64; n];
    let mut positive = vec![false; n];
    let mut auc = Vec::with_capacity(classes);
    for c in 0..classes {
        for i in 0..n {
            scores[i] = probs[i * classes + c] as f64;
            positive[i] = labels[i] == c;
        }
        auc.push(roc_auc(&scores, &positive));
    }
    let defined: Vec<f64> = auc.iter().flatten().copied().collect();
    let macro_auc = if defined.is_empty() {
        f64::NAN
    } else {
        defined.iter().sum::<f64>() / defined.len() as f64
    };

    // SRC-MT: per-class binarisation at the threshold, then class averages.
    let mut s = SrcmtMetrics {
        threshold,
        accuracy: 0.0,
        sensitivity: 0.0,
        specificity: 0.0,
        precision: 0.0,
        f1: 0.0,
    };
    for c in 0..classes {
        let (mut tp, mut fp, mut tn, mut fneg) = (0usize, 0usize, 0usize, 0usize);
        for i in 0..n {
            let pred = probs[i * classes + c] as f64 >= threshold;
            match (pred, labels[i] == c) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, false) => tn += 1,
                (false, true) => fneg += 1,
            }
        }
        let sens = ratio(tp, tp + fneg);
        let prec = ratio(tp, tp + fp);
        s.accuracy += ratio(tp + tn, n);
        s.sensitivity += sens;
        s.specificity += ratio(tn, tn + fp);
        s.precision += prec;
        s.f1 += f1_of(prec, sens);
    }
    let k = classes as f64;
    s.accuracy /= k;
    s.sensitivity /= k;
    s.specificity /= k;
    s.precision /= k;
    s.f1 /= k;

    Ok(Metrics {
        n,
        accuracy,
        balanced_accuracy,
        macro_f1,
        auc,
        macro_auc,
        confusion,
        srcmt: s,
        loss: None,
    })
}

/// Name of class `c`: `class_names[c]` when given, else `c<index>`.
pub(crate) fn class_name(class_names: &[String], c: usize) -> String {
    class_names
        .get(c)
        .cloned()
        .unwrap_or_else(|| format!("c{c}"))
}

/// The confusion matrix as an aligned text table: rows are true classes, columns predicted
/// classes, with each row's support and recall (and each class's AUC) on the right.
pub fn confusion_ascii(m: &Metrics, class_names: &[String]) -> String {
    let k = m.confusion.len();
    let names: Vec<String> = (0..k).map(|c| class_name(class_names, c)).collect();
    let corner = "true \\ pred";
    let w0 = names
        .iter()
        .map(|s| s.chars().count())
        .chain([corner.chars().count()])
        .max()
        .unwrap_or(0);
    let max_count = m.confusion.iter().flatten().copied().max().unwrap_or(0);
    let colw: Vec<usize> = names
        .iter()
        .map(|s| s.chars().count().max(max_count.to_string().len()))
        .collect();
    let pad_left =
        |s: &str, w: usize| format!("{}{s}", " ".repeat(w.saturating_sub(s.chars().count())));
    let pad_right =
        |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));

    let mut out = String::new();
    out.push_str(&pad_right(corner, w0));
    for (c, name) in names.iter().enumerate() {
        out.push_str("  ");
        out.push_str(&pad_left(name, colw[c]));
    }
    out.push_str("  support  recall     AUC\n");
    for (t, row) in m.confusion.iter().enumerate() {
        out.push_str(&pad_right(&names[t], w0));
        for (c, &v) in row.iter().enumerate() {
            out.push_str("  ");
            out.push_str(&pad_left(&v.to_string(), colw[c]));
        }
        let support: usize = row.iter().sum();
        let recall = if support > 0 {
            format!("{:.4}", row[t] as f64 / support as f64)
        } else {
            "-".to_string()
        };
        let auc = match m.auc.get(t).copied().flatten() {
            Some(a) => format!("{a:.4}"),
            None => "-".to_string(),
        };
        out.push_str(&format!("  {support:>7}  {recall:>6}  {auc:>6}\n"));
    }
    out
}

/// One line: n, accuracy, balanced accuracy, macro-F1, macro-AUC, SRC-MT accuracy/F1 (and loss).
pub fn summary_line(m: &Metrics) -> String {
    let mut s = format!(
        "n={} acc={:.4} bal-acc={:.4} macro-F1={:.4} macro-AUC={:.4} SRC-MT@{}: acc={:.4} F1={:.4}",
        m.n,
        m.accuracy,
        m.balanced_accuracy,
        m.macro_f1,
        m.macro_auc,
        m.srcmt.threshold,
        m.srcmt.accuracy,
        m.srcmt.f1
    );
    if let Some(l) = m.loss {
        s.push_str(&format!(" loss={l:.4}"));
    }
    s
}
