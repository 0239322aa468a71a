"""Interval calibration from cross-validation inside the training rows.

After the GP fit, every training row gets standardised held-out errors with the fitted
hyperparameters: leave-one-out (what a new report next to existing ones sees; the random split)
and spatial-block K-fold at CV_BLOCK_MULTIPLES of the block side, refitted per fold (`foldcv.py`) (a report in a hole of the data;
the block split). Each held-out variance splits into the latent (epistemic) part and the noise
(aleatoric) part, and each held-out row carries its distance to the nearest row it was predicted
from. Per shard (per kind of model) one factor on the aleatoric std and one factor on the
epistemic std per distance bin (DIST_EDGES_M) minimise the calibration error plus the 50% and
90% interval coverage errors: the noise factor over all sets (mean over the sets, so neither kind
of prediction is favoured), each epistemic factor over the held-out rows in its bin. The
epistemic factors are then made non-decreasing in distance (weighted isotonic regression): a
single factor could not fit both regimes, because hyperparameters fitted on all rows make the GP
more confident in gaps than its errors there warrant, more so the farther the gap. At prediction
the factor of the row's distance to its nearest training row applies. Nothing here sees held-out rows.

Support-aware form (EP_MODE "support", `interval_scales_support`; NOT the default): the
epistemic factor is a exp(b v) with v = posterior / stationary prior variance of the row (clipped
to 1, known at prediction), b >= 0 so a row with less support never gets a narrower factor
(monotone, a priori). (a, b) and the aleatoric factor minimise the same objective averaged over
the held-out sets. Compared with the one factor in the nested harness (bench/radio_inner.py, the
outer split's training rows split again; bench/results/radio_inner.json, variants "flat" vs
"ep_support_only" and "blend_support_only" vs "support"): its mean interval score
CE + |cov50 - 0.5| + |cov90 - 0.9| over UCC and Purdue, random and blocks, was not lower, so
the default stays one factor ("flat").

Shape of the predictive distribution (TAIL_MODE): drive-test errors are heavier-tailed than a
Gaussian, so one std factor cannot give both the 50% and the 90% interval their coverage (the
50% one came out right and the 90% one short). With TAIL_MODE "t" the predictive is a Student-t
in standard-deviation form (mean, std = sqrt(epistemic^2 + aleatoric^2), `dof` degrees of
freedom: the t scaled so that its std is that std), and per shard (per kind of model) the dof
is chosen from DOF_GRID together with the std factors, by the same objective on the same
held-out training rows: for every dof the factors are fitted, and the dof with the lowest
objective wins (ties go to the lighter tail). dof = inf is the Gaussian. "gauss" fixes dof = inf.
Chosen by the nested harness (bench/radio_inner.py, all cells, UCC and Purdue, random and blocks;
rule written before the runs: lowest mean interval score CE + |cov50 - 0.5| + |cov90 - 0.9| over
the four pairs, the per-shard choice if within 0.005 of the best): Gaussian 0.108, dof per shard
from DOF_CANDIDATES 0.070, dof fixed at 6 0.062 (bench/results/radio_inner.json), so the default
is the Student-t with 6 degrees of freedom; the std factors are still fitted per shard.

Compared in session 9 (nested harness at 3 inner seeds, all cells, the four pairs; rules written
before the runs, a variant replaces the default only if its mean-over-pairs interval score is
lower at every seed; bench/results/radio_inner.json, "<variant>~s3"): the random held-out set
refitted per random fold (RANDOM_CV "kfold", 3 or 5 folds, with dof 6, per shard, or 4) instead
of the closed-form leave-one-out, and a factor per distance-to-site bin (SITE_EDGES_M, on either).
None was lower at every seed (3-seed means: loo 0.086, site 0.088, rfold5 0.094, rfold3_t 0.094,
rfold3 0.098, rfold3_t4 0.101, rfold3_site 0.104), so the leave-one-out set and one bin stay.
The refitted folds do bring Purdue's random-split cov90 to 0.90 but overshoot cov50 (0.53-0.56).

Session 10, rule D (written in session 9 before the runs: adopt iff the mean-over-pairs pooled
MAE is lower than loo's at every one of the 3 inner seeds and the 3-seed mean interval score is
not higher by more than 0.005): RANDOM_CV "kfold_mean" (the kNN weight of the mean chosen on the
refitted random folds and blocks, the intervals still on leave-one-out and blocks). Pooled MAE by
seed 4.446 / 4.717 / 4.400 against loo's 4.467 / 4.746 / 4.424, interval score 0.085 against
0.086: adopted, the default since session 10 ("rfold3_mean~s3" in radio_inner.json). It costs a
second set of refits (three random folds) per shard.

Session 11, rule F (written before the run: adopt iff the mean-over-pairs interval score is lower
than the default's at every one of the 3 inner seeds, pooled MAE not higher by > 0.02 dB): the
interval factors on the refitted random folds + blocks (RANDOM_CV "kfold") on the session-10 mean.
Interval score by seed 0.074 / 0.125 / 0.069 against the default's 0.068 / 0.118 / 0.086 (pooled MAE
equal): rejected, "kfold_mean" stays ("h25_rfold3~s3" in radio_inner.json). It fixes Purdue's
random-split cov90 inside the training rows (0.89-0.92) but overshoots cov50 and widens UCC random.

Session 11, rule G (written before the run: adopt iff the mean-over-pairs pooled MAE is lower at
every inner seed and the 3-seed mean interval score is not higher by more than 0.005): MEAN_SHIFT,
one constant per shard on the mean. Pooled MAE by seed 4.266 / 4.449 / 4.306 against 4.280 / 4.534 /
4.358, interval score 0.073 against 0.091 ("h25_shift~s3"): the criteria are met. The decision came
after the time the rule left for the outer bench and the tests, so by its last clause the option
stayed off in session 11; session 12 switched it on (MEAN_SHIFT = True, adopted by rule G's inner
criteria above; nothing was chosen from an outer score) and ran the outer bench once, for
reporting. Median-cell MAE rose inside the training rows (3.968 against 3.938), which rule G did
not weigh.

Session 12, rule H (written before any run, notes/s12/radio.md; run in session 13): the epistemic
ratio 3 km out / training positions (issue 14: >= 10x, <= 25 dB; 7.1-9.0x outer, 6.2-9.1x inner).
Candidate "h25_shift_dist" (bench/radio_inner.py): the default with DIST_EDGES_M = (0, 15, 40, 100,
250) m, the edges in that constant's comment. Adopt iff (1) the 3-seed mean inner ratio is higher on
each of the four pairs (max std <= 25 dB), (2) the 3-seed mean interval score is not higher than the
default's ("h25_shift", rerun in the same call) by more than 0.005, (3) the mean-over-pairs pooled
MAE is not higher by more than 0.005 dB at any seed, (4) the decision comes in time for the outer
bench and the tests (session 12: no CPU slot in time, so it stayed off; session 13: by 12:15 UTC).
Session 13 ("h25_shift_dist~s3" in radio_inner.json): ratio 6.2 -> 8.4 (Purdue random), 6.8 -> 10.2
(Purdue blocks), 7.6 -> 13.7 (UCC random), 9.1 -> 18.5 (UCC blocks), max std 25 dB; interval score
0.0735 -> 0.0783 (+0.0049); MAE identical at every seed: adopted, DIST_EDGES_M on since session 13.
The ratio rises at both ends: the epistemic std at training positions falls (2.2 / 2.2 / 2.0 / 1.8 ->
2.0 / 1.9 / 1.3 / 1.0 dB: the nearest bin's factor) and 3 km out it rises (13.9 / 15.0 / 14.8 / 15.9 ->
17.1 / 18.7 / 17.7 / 17.1 dB). Purdue random's cov90 inside the training rows fell 0.879 -> 0.871 (the
rule does not weigh pairs one by one). Fitted models store their edges ("dist_edges_m").

Session 13, rule I (written before the run, notes/s13/radio.md): the mean shift only where row
weights differ (SHIFT_WEIGHTED_ONLY: fitted on and added to the cells whose training rows carry
non-uniform weights; the others keep the unshifted mean). A priori the shift's mechanism is row
aggregation, and without weights the fitted shift looked like noise (+0.10 dB on an unbiased
synthetic field). Non-inferiority rule: adopt iff the 3-seed mean-over-pairs pooled MAE and
interval score are each not higher than the default's by more than 0.005, and on no pair the
pooled or median-cell MAE is higher by more than 0.02 dB or the interval score by more than 0.01.
"h25_shift_wonly~s3": Purdue identical (every cell weighted); UCC random MAE 3.367 -> 3.361, CE
0.014 -> 0.009; UCC blocks MAE 5.838 -> 5.854 (+0.017), median-cell 5.381 -> 5.313, interval score
0.119 -> 0.124; means +0.0027 dB and +0.0002: adopted, on since session 13.

Session 15, rule K (written before the run, notes/s15/radio.md): RANDOM_CV "kfold_split". Session 14's
rule J (interval factors on the refitted random folds + blocks) lowered the interval score but the one
objective then traded the aleatoric factor down: on tests/test_synthesizer.py's simulated world (known
2 dB noise) the median aleatoric std fell from 1.70 to 1.39 dB, so J was reverted. K keeps the default's
fit of the aleatoric factor and dof (leave-one-out + blocks: rows next to their neighbours identify the
noise) and refits only the epistemic distance bins on the refitted sets with that factor fixed. Adopt iff
the 3-seed interval score is lower, MAE not higher (0.005 dB mean, 0.02 per pair), max epistemic std <= 25
dB and the mean-over-pairs epistemic ratio 3 km / training positions not lower, and the known-noise
aleatoric figure kept. "s15_ivl_split~s3": interval score 0.0785 -> 0.0732, MAE identical, aleatoric
factor identical by construction, but the ratio fell on all four pairs (mean 11.5 -> 10.2x): the
refitted-fold rows' larger errors next to the data, with the noise factor held, go into the nearest
bins (epistemic std at training positions 2.05 -> 2.24 dB on Purdue random). Rejected; "kfold_mean" stays.

Session 16, rule L (written before the run, notes/s16/radio.md): RANDOM_CV "kfold_split_far", K with the
nearest bins held: per shard the bins up to the one holding the median leave-one-out row's distance keep
the "kfold_mean" factors (the leave-one-out rows identify them), only the farther bins are refitted on
the refitted sets (aleatoric factor and dof held), isotonic among themselves and clipped below at the
seam bin's factor. Same clauses as K. "s16_ivl_far~s3": interval score 0.0785 -> 0.0783, MAE identical,
known-noise aleatoric median 1.695 dB (= default), but the mean ratio 11.526 -> 11.517x (UCC random 12.75
-> 12.58x). Rejected; "kfold_mean" stays. With the near bins held, Purdue random's inner cov90 stays at
0.871 (K: 0.887): K's gain came through the same bins whose rise cut the ratio.

Session 16, rule M (written before the run, notes/s16/radio.md): FAR_DOF, a dof of its own for the distance
bins beyond the median leave-one-out distance's bin, chosen with those bins' factors on the block set's far
rows (`far_tail`); aimed at UCC blocks' cov90. Rule L's clauses plus UCC blocks' |cov90 - 0.9| not larger.
"s16_far_dof~s3": interval score 0.0785 -> 0.0761 (lower at every seed), MAE identical, mean ratio 11.53 ->
11.70x, but UCC blocks' cov90 0.893 -> 0.888 (the block set's far rows chose a lighter tail and narrower
factors). Rejected; FAR_DOF stays off. Rule M' (notes/s16/lead.md): the same code on fresh inner splits 4-6
(radio_inner --inner-seed-start 4), general clauses only plus a harm guard: "s16_far_dof~s3@from4" interval
score 0.0763 -> 0.0782 (higher at all three seeds) against the default on the same splits. Rejected: M's gain
did not repeat on fresh splits.

Session 21, rule N (written before the run, notes/s21/radio.md): NEAR_EMPTY "unit". A thin distance bin nearer than
every valid bin took the first valid bin's factor; on gridded data (Purdue, 55 m squares) no held-out row is nearer
than the grid step, so bins 0-15 and 15-40 m are empty and a factor fitted on rows 55+ m away applied at the training
positions themselves. The factors are non-decreasing in distance, so the data only say f <= f_first there; without
evidence the model's own posterior (factor 1) is the neutral statement: such bins take min(1, f_first). Adopt iff the
mean-over-pairs epistemic ratio 3 km / training positions is higher with no pair lower by > 1%, interval score and
coverages unchanged (0.001 / 0.002), MAE unchanged, known-noise aleatoric within 0.01 dB. Fresh inner seeds 19-21
("s21_near_unit~s3@from19" against "s17_tree_fade~s3@from19"): ratio 11.95 -> 12.18x (Purdue random 8.39 -> 8.58,
Purdue blocks 11.64 -> 12.37; UCC identical, its near bins hold rows), everything else identical (interval score
0.0696, MAE by seed 4.339 / 4.628 / 4.107 dB), aleatoric median 1.695 dB under both: adopted.

Session 21, rule O (same notes, same seeds): RANDOM_CV "kfold_all", the interval factors on the leave-one-out,
block and random-fold sets together (the mean as "kfold_mean"), on top of N. Adopt iff more of the 8 (pair, level)
mean coverages fall within +-0.03 of nominal, interval score not higher by > 0.005, MAE unchanged, mean ratio not
lower by > 3%, known-noise aleatoric not further from 2.0 dB by > 0.05. Coverages within 5 -> 7 of 8 (UCC blocks
cov50 0.531 -> 0.527, Purdue random cov90 0.870 -> 0.872), interval score 0.0696 -> 0.0683, MAE identical, but the
ratio 12.18 -> 11.46x (-5.9%; the training-position std rose on three pairs) and the aleatoric median 1.695 ->
1.629 dB: rejected twice over; RANDOM_CV stays "kfold_mean".

Session 22 (rules in notes/s22/radio.md, each written before its run; fresh inner seeds, "<variant>~s3@from<seed>"):
rule P, K (RANDOM_CV "kfold_split") on top of N, seeds 22-24: interval score 0.0811 -> 0.0757 but the training-position
std rose on every pair and UCC random's ratio fell 10.38 -> 9.30x: rejected. Rule Q, FAR_EMPTY "unit" (thin bins beyond
every valid bin take max(1, f_last), the mirror of N): identical on every pair (no such bin: the block CV reaches past
250 m): rejected, the switch stays "last". Rule R, RANDOM_CV "kfold_split_first" (K with bin 0, a report at an existing
position, held at the default's factor; bins beyond refitted on the refitted sets and clipped below at bin 0), judged
three times on fresh seeds as its clauses were corrected to the issue's targets (22-24, 25-27, 28-30): the interval score
fell every time (0.0811 -> 0.0741, 0.0820 -> 0.0751, 0.0814 -> 0.0753) and Purdue random's cov90 rose by 0.014-0.020, but
each try failed one clause as written (a ratio floor mis-specified; a coverage move of +0.011 on Purdue random's cov50
against a 0.01 guard; Purdue blocks' ratio -1.9% against a 1% limit): not adopted. Rule S, RANDOM_CV
"kfold_split_first_max" (R's bins, then per bin the larger of R's factor and the default's), seeds 31-33: interval
score 0.0635 -> 0.0646 (the default was within +-0.03 on all 8 coverages there): rejected; R beside it 0.0640.

Session 24, rule U (written before the run, notes/s24/radio.md): BIN_SET_WEIGHTS "equal_far", every held-out set with
MIN_ROWS_BIN rows in a distance bin beyond the first carries the same total weight in that bin's factor fit (session 22's
diagnostic: in Purdue's 40-100 m bin the leave-one-out rows outnumber the block rows). Adopt iff, on fresh inner seeds
34-36 against the default on the same splits, the interval score is lower, no fewer of the 8 coverages within +-0.03,
MAE equal, and on no pair the ratio 3 km / training positions lower by > 3% nor the training-position std higher by
> 3% (plus the known-noise aleatoric, not run). "s24_bin_equal~s3@from34": interval score 0.0792 -> 0.0744, coverages
within 7 -> 7, MAE identical, Purdue random cov90 0.875 -> 0.879, UCC random's ratio 13.9 -> 15.6x; but on Purdue blocks
the training-position std rose 1.459 -> 1.557 dB (+6.7%) and the ratio fell 13.21 -> 12.25x (-7.3%): rejected, "pooled"
stays. (The balanced far bins lowered the first valid bin's factor's upper bound that NEAR_EMPTY takes min(1, .) of.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr
from scipy.stats import norm
from scipy.stats import t as student_t

# Probability levels of the calibration error (issue 14: p = 0.05 ... 0.95).
CE_LEVELS = np.round(np.arange(0.05, 0.951, 0.05), 2)
# Candidate factors on each std, a priori grid: 0.25x to 4x in ~4% steps; coordinate descent.
SCALE_GRID = np.geomspace(0.25, 4.0, 71)
# Central intervals whose coverage error joins the calibration error in the objective: drive-test
# errors are heavier-tailed than a Gaussian, and the calibration error alone (19 equally weighted
# levels) let the 90% interval undercover; these are the coverages issue 14 reports.
INTERVALS = (0.5, 0.9)
DESCENT_ROUNDS = 3
# Rows per set the factors are chosen on (a uniform subsample beyond; cost, not accuracy).
MAX_ROWS_PER_SET = 20_000
# Spatial-block CV: blocks of `block_m` (the block split's own side) go to this many folds.
BLOCK_FOLDS = 3
# Fewer held-out errors than this (pooled over a shard) leave the factor at 1.
MIN_ROWS = 20
# Internal block CV at these multiples of FitSettings.cv_block_m: the block split's own side only
# (a priori; every multiple costs three refits of the cell, `foldcv.py`).
CV_BLOCK_MULTIPLES = (1.0,)
# The "random" held-out set the factors (and the kNN weight) are fitted on: "loo" = closed-form
# leave-one-out with everything else fitted on all rows (site estimate, prior mean, hyperparameters
# have seen the held-out row: optimistic where the site estimate is the strongest rows' centre);
# "kfold" = RANDOM_FOLDS random folds of the rows, the whole fit redone without each fold
# (`foldcv.py`, as the block CV); "kfold_mean" = both: the kNN weight of the mean from the refitted
# sets (random folds and blocks), the interval factors from the leave-one-out and block sets;
# "kfold_split" = the mean of "kfold_mean", its aleatoric factor and dof, and the epistemic distance
# bins refitted on the refitted sets (random folds and blocks) with that aleatoric factor fixed;
# "kfold_split_far" = as "kfold_split", but the bins up to the one holding the median leave-one-out
# row's distance keep the "kfold_mean" factors (where the leave-one-out rows identify them) and only the
# farther bins are refitted (rule L, session 16); "kfold_all" = the mean of "kfold_mean", the interval
# factors on all three sets (rule O, session 21: rejected); "kfold_split_first" = as "kfold_split_far" with
# only bin 0 held (rule R, session 22: not adopted); "kfold_split_first_max" = per bin the larger of that factor
# and "kfold_mean"'s (rule S, session 22: rejected).
# Chosen by the nested harness (module docstring; "kfold_mean" since session 10, rule D).
RANDOM_CV = "kfold_mean"
RANDOM_FOLDS = 3
# The RANDOM_CV values by what `model.fit_cells` does for them: refit the random folds (every value but "loo");
# take the mean's stack weights and shift from the refitted sets (every value beyond "kfold"); refit the
# epistemic distance bins on the refitted sets with the aleatoric factor and dof held (the "kfold_split" family).
RANDOM_FOLD_MODES = ("kfold", "kfold_mean", "kfold_split", "kfold_split_far", "kfold_split_first",
                     "kfold_split_first_max", "kfold_all")
SPLIT_MEAN_MODES = RANDOM_FOLD_MODES[1:]
SPLIT_INTERVAL_MODES = ("kfold_split", "kfold_split_far", "kfold_split_first", "kfold_split_first_max")
# One constant per shard (and kind of model) added to the mean (MEAN_SHIFT, `mean_shift`): the
# value of SHIFT_GRID_DB with the lowest mean over the refitted held-out sets (the ones the kNN weight
# is fitted on) of the row-weighted MAE of the final mean's errors minus it. Where rows aggregate
# samples (Purdue's squares), heavily sampled squares sit above what a model that knows no row
# weight predicts for a new position, so a sample-weighted prediction carries a positive offset;
# measured on the training rows' own held-out errors. On since session 12 (adopted by session 11's
# rule G on the nested harness; see the module docstring).
MEAN_SHIFT = True
# True: the shift is fitted on, and added to, only the cells whose training rows carry row weights
# that differ (the aggregation the shift is meant for); cells with uniform weights get none, since
# without weights the mechanism above is absent. On since session 13 (rule I, module docstring).
SHIFT_WEIGHTED_ONLY = True
# A priori: +-3 dB (beyond any offset seen inside the training rows) in 0.05 dB steps.
SHIFT_GRID_DB = np.round(np.arange(-3.0, 3.0001, 0.05), 2)
# Bins of the distance to the cell's site (given, or estimated from the rows) for one more factor
# on the whole predictive std, fitted after the global factors on each bin's held-out rows
# (`site_factors`): near a site the field changes faster than a stationary GP states (antenna
# pattern, near field) and a site-wide factor over-covers far rows to under-cover near ones.
# (0.0,): one bin, no such factor. Edges a priori: half-decade steps from 100 m (rows beyond the
# last edge are a few per cent); chosen or not by the nested harness (module docstring).
SITE_EDGES_M: tuple[float, ...] = (0.0,)
# Bins of the distance to the nearest training row for the epistemic factor (and, with the flat
# stacking, the kNN weight; under the default "support" stacking the mean does not depend on them).
# Edges a priori: ~half-decade steps from the row spacing to beyond the 200 m block side. An early
# single nested split (UCC blocks, before the support stacking) found them worse and they stayed
# off; since session 13 they are on, adopted by rule H on the nested harness (module docstring:
# the 3 km / training-position epistemic ratio higher on all four pairs, interval score within
# 0.005, MAE unchanged). Bins with fewer than MIN_ROWS_BIN held-out rows take the factor of the
# nearest bin below.
DIST_EDGES_M = (0.0, 15.0, 40.0, 100.0, 250.0)
MIN_ROWS_BIN = 50
# A thin bin nearer than every valid bin (no held-out row that near: gridded data, where no row is nearer
# than the grid step): "first" takes the first valid bin's factor; "unit" takes min(1, that factor):
# the factors are non-decreasing in distance, so the data only say f <= f_first there, and without
# evidence the model's own posterior (factor 1) is the neutral statement. "unit" since session 21 (rule N,
# module docstring: adopted on the nested harness).
NEAR_EMPTY = "unit"
# The mirror for thin bins farther than every valid bin (where the 3 km prediction falls when no held-out row
# reaches that far): "last" takes the last valid bin's factor; "unit" takes max(1, that factor): isotonic in
# distance, the data only say f >= f_last there, and the model's own posterior (factor 1) is the neutral statement.
# "last" (rule Q, session 22: "unit" changed nothing on the inner splits, every far bin held rows; module docstring).
FAR_EMPTY = "last"
# How the held-out sets' rows share a distance bin's epistemic factor fit: "pooled" = every row at its own weight
# (row weight or 1), so a set with more rows in the bin weighs more; "equal_far" = in every bin beyond the first,
# each set with at least MIN_ROWS_BIN rows there carries the same total weight (its rows' weights times the mean
# of those sets' totals over its own), thinner sets keep their weights; bin 0 (a report at an existing position)
# and the aleatoric factor's objective (already a mean over sets) as "pooled". A priori: the sets are different
# held-out regimes (leave-one-out: a row among its neighbours; blocks: a row in a gap), and how many rows each
# puts in a bin is an artefact of the CV design (gridded data: every leave-one-out row one grid step away).
# "pooled": "equal_far" was rejected by the nested harness (rule U, session 24; module docstring).
BIN_SET_WEIGHTS = "pooled"
# Weak pull of every factor towards 1 (objective units per e-fold): where the objective is flat
# (latent variance negligible next to the noise) a factor stays near 1 instead of drifting to a
# grid end; 0.005 is a quarter of one CE level's resolution (1/19 / 10), a priori.
FACTOR_PULL = 0.005
# "support": epistemic factor a exp(b v) (interval_scales_support); "flat": one factor (the
# default: chosen by the nested harness, see the module docstring).
EP_MODE = "flat"
# Candidate slopes b, a priori: 0 to 4 (a factor up to e^4 ~ 55 between no support and full support) in 0.25 steps.
SLOPE_GRID = np.round(np.arange(0.0, 4.001, 0.25), 2)


# "t": Student-t predictive, dof from DOF_GRID by the training-row objective; "gauss": dof = inf.
# "t" with dof 6: chosen by the nested harness (module docstring).
TAIL_MODE = "t"
# Candidate degrees of freedom, a priori: 3 (the heaviest tail with a finite variance to spare)
# to 30 in roughly even steps of the 90% half-width, and inf (Gaussian).
DOF_CANDIDATES = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, np.inf)
# The dofs searched per shard under TAIL_MODE "t": one, 6 (nested harness: a fixed 6 had a lower
# mean interval score than the per-shard choice over DOF_CANDIDATES, whose choices on Purdue's
# shards scattered from 4 to 30; see the module docstring).
DOF_GRID = (6.0,)
# True (rule M, session 16; NOT the default): after the fit above, the distance bins beyond the one holding the
# median leave-one-out row's distance (the "far" bins, where a prediction reaches into a hole of the data) get their
# own dof from DOF_CANDIDATES and their epistemic factors refitted for it, both on the block set's rows in those bins
# only (`far_tail`); the near bins, the aleatoric factor and the mean are unchanged. The model then stores a dof per
# distance bin ("dof_bins").
FAR_DOF = False


# True (rule X, session 28; NOT the default): a position-error term on the aleatoric variance, sigma^2 |grad m(x)|^2,
# with m's log-distance term's radial gradient |b| d / (D^2 ln 10) (b: the cell's log-distance coefficient, d the 2-D
# and D the 3-D distance to the site): a reported position off by sigma metres moves RSRP by about the mean's gradient
# times sigma, which is large only near the site (first-order input noise, as in McHutchon & Rasmussen's NIGP). sigma
# per shard and kind from POSITION_SIGMA_GRID_M by the interval objective on the held-out sets, after the factors
# (grid searched upwards, strictly lower to move: ties keep 0, the model without the term).
POSITION_NOISE = False
# Candidate position errors, a priori: 0 and doublings from 2 m (a good GNSS fix) to 64 m (MDT positions and grid squares
# of tens of metres).
POSITION_SIGMA_GRID_M = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


# True (rule AA, session 37; candidate): the leave-one-out set's errors of a cell with n fitted rows scaled by
# sqrt(n / (n - p)) before the interval factors are fitted on them. The closed-form leave-one-out keeps everything
# else fitted on all rows, the left-out one included: the hyperparameters (3 numbers, marginal likelihood) and, where
# no cells table gives the site, the site estimate (2 coordinates); the mean's coefficients are integrated out by the
# GP (geometry.py), the block set refits all of it (foldcv.py). p point-estimated numbers that have seen the row make
# its held-out error small by about (n - p) / n in variance, the textbook small-sample bias of a fitted variance, which
# vanishes with many rows and matters with a handful (bench/radio_real.py --max-train-rows: 90% intervals at 0.84-0.86
# with 15 training rows per cell). p counted a priori, nothing fitted. Rejected by its rule (bench/radio_inner.py,
# fresh inner seeds 62-64): at 15 and 40 rows per cell the mean interval score was not lower at every seed (3-seed
# means 0.116 -> 0.094 and 0.087 -> 0.082, one seed higher at each cap; cov50 overshot to 0.53 on the random splits at
# 15 rows) and the known-noise world's aleatoric median fell 1.695 -> 1.629 dB. Kept off.
LOO_SMALL_SAMPLE = False
LOO_THETA_PARAMS = 3  # length scale, signal and noise variance (gp.unpack)
LOO_SITE_PARAMS = 2  # the site's two coordinates, when estimated from the rows


def loo_inflation(n_rows: int, site_estimated: bool) -> float:
    """sqrt(n / (n - p)) of LOO_SMALL_SAMPLE for a cell with n_rows fitted rows (n - p at least 1)."""
    p = LOO_THETA_PARAMS + (LOO_SITE_PARAMS if site_estimated else 0)
    return float(np.sqrt(n_rows / max(n_rows - p, 1)))


def position_grad2(site_dist_m: np.ndarray, slope_db: np.ndarray | float, height_m: np.ndarray | float) -> np.ndarray:
    """|grad of b log10(D / 1 km)|^2 in (dB / m)^2 at 2-D distance d from the site, D^2 = d^2 + H^2 (POSITION_NOISE)."""
    d = np.asarray(site_dist_m, dtype=float)
    big_d2 = np.maximum(d**2 + np.asarray(height_m, dtype=float) ** 2, 1.0)
    return (np.asarray(slope_db, dtype=float) * d / (big_d2 * np.log(10.0))) ** 2


def position_sigma(sets: list[tuple[np.ndarray, ...]], f_ep: np.ndarray, f_al: float, dof: float) -> float:
    """sigma of POSITION_NOISE from held-out sets (error, latent variance, noise variance, distance to the nearest row,
    squared mean gradient[, row weight]) given the fitted factors: the POSITION_SIGMA_GRID_M value with the lowest mean
    over the sets of `interval_error_z` (ties keep the smaller)."""
    sets = [tuple(np.asarray(a, dtype=float) for a in st) for st in sets if len(st[0])]
    if not sets or sum(len(st[0]) for st in sets) < MIN_ROWS:
        return 0.0
    base = [st[:4] + st[5:] for st in sets]  # without the gradient row: the layout `held_out_objective` reads
    best = None
    for sig in POSITION_SIGMA_GRID_M:
        val = held_out_objective(base, f_ep, f_al, dof, extra_var=[sig**2 * st[4] for st in sets])
        if best is None or val < best[0]:
            best = (val, float(sig))
    return best[1]


def mean_shift(sets: list[tuple[np.ndarray, ...]]) -> float:
    """The constant c of SHIFT_GRID_DB added to the mean: lowest mean over the sets of (error,
    [row weight]) of the (weighted) MAE of error - c (each set counts equally); 0 with fewer than
    MIN_ROWS rows."""
    sets = [tuple(np.asarray(a, dtype=float) for a in st) for st in sets if len(st[0])]
    if sum(len(st[0]) for st in sets) < MIN_ROWS:
        return 0.0
    mae = [np.mean([np.average(np.abs(st[0] - c), weights=st[1] if len(st) > 1 else None) for st in sets])
           for c in SHIFT_GRID_DB]
    return float(SHIFT_GRID_DB[int(np.argmin(mae))])


def std_t_cdf(z: np.ndarray, dof: float) -> np.ndarray:
    """CDF of the Student-t with `dof` degrees of freedom scaled to unit standard deviation
    (the standard normal's for dof = inf)."""
    z = np.asarray(z, dtype=float)
    if not np.isfinite(dof):
        return ndtr(z)
    return student_t.cdf(z * np.sqrt(dof / (dof - 2.0)), dof)


def std_t_ppf(p: np.ndarray, dof: float) -> np.ndarray:
    """Quantile function of the unit-std Student-t (`std_t_cdf`'s inverse)."""
    if not np.isfinite(dof):
        return norm.ppf(p)
    return student_t.ppf(p, dof) * np.sqrt((dof - 2.0) / dof)


def std_t_draws(rng: np.random.Generator, dof: np.ndarray | float, n: int) -> np.ndarray:
    """n draws of unit-std Student-t variables (row-wise dof; standard normal draws where dof is inf)."""
    dof = np.broadcast_to(np.asarray(dof, dtype=float), (n,))
    out = rng.standard_normal(n)
    heavy = np.isfinite(dof)
    if heavy.any():  # normal / sqrt(chi2 / dof), rescaled to unit std
        d = dof[heavy]
        out[heavy] = out[heavy] / np.sqrt(rng.chisquare(d) / d) * np.sqrt((d - 2.0) / d)
    return out


def normal_to_std_t(z: np.ndarray, dof: np.ndarray | float) -> np.ndarray:
    """Standard normal draws z mapped to unit-std Student-t draws with row-wise `dof` by the
    quantile transform F_t^-1(Phi(z)) (monotone, exact in distribution; z itself where dof is
    inf). Callers that drew z before the dof was known (generate) keep their random stream."""
    z = np.asarray(z, dtype=float)
    dof = np.broadcast_to(np.asarray(dof, dtype=float), z.shape)
    out = z.copy()
    for d in np.unique(dof[np.isfinite(dof)]):
        k = dof == d
        # from the lower tail on both sides (Phi(z) rounds to 1 far out in the upper tail); |z| <= 20
        # keeps the t quantile finite (scipy returns -inf for Phi(-37)); a 20-sigma normal draw does not happen
        out[k] = -np.sign(z[k]) * std_t_ppf(ndtr(-np.minimum(np.abs(z[k]), 20.0)), float(d))
    return out


# half-widths of the central INTERVALS and the CE levels in standard deviations, per dof (cached)
_INTERVAL_Z = tuple(float(norm.ppf(0.5 + q / 2)) for q in INTERVALS)
_Z_CACHE: dict[float, tuple[tuple[float, ...], np.ndarray]] = {}


def _z_of(dof: float) -> tuple[tuple[float, ...], np.ndarray]:
    if dof not in _Z_CACHE:
        _Z_CACHE[dof] = (tuple(float(std_t_ppf(0.5 + q / 2, dof)) for q in INTERVALS), np.asarray(std_t_ppf(CE_LEVELS, dof)))
    return _Z_CACHE[dof]


def interval_error_z(z: np.ndarray, scale: float = 1.0, weight: np.ndarray | None = None, dof: float = np.inf) -> float:
    """Calibration error plus the coverage errors of the central INTERVALS (objective of the
    factors) of a unit-std predictive with `dof` (inf: Gaussian); with `weight`, every share is a
    weighted share (rows that stand for several raw samples count that many times, as in the metrics)."""
    z = np.asarray(z, dtype=float) / scale
    half = _INTERVAL_Z if not np.isfinite(dof) else _z_of(dof)[0]
    if weight is None:
        cover = sum(abs(float(np.mean(np.abs(z) <= h)) - q) for q, h in zip(INTERVALS, half))
        return calibration_error_z(z, dof=dof) + cover
    w = np.asarray(weight, dtype=float)
    w = w / w.sum()
    cover = sum(abs(float(np.sum(w * (np.abs(z) <= h))) - q) for q, h in zip(INTERVALS, half))
    return calibration_error_z(z, weight=w, dof=dof) + cover


_CE_Z = norm.ppf(CE_LEVELS)


def calibration_error_z(z: np.ndarray, scale: float = 1.0, weight: np.ndarray | None = None, dof: float = np.inf) -> float:
    """Mean over CE_LEVELS of |share(PIT <= p) - p| for standardised errors z (std scaled by
    `scale`) under a unit-std predictive with `dof` (inf: Gaussian); with `weight`, weighted shares."""
    if np.isfinite(dof) and weight is None:  # as below with unit weights: the cumulative weights are the counts
        x = np.sort(np.asarray(z, dtype=float)) / scale  # (a sort, not an argsort: the same sorted values)
        counts = np.searchsorted(x, _z_of(dof)[1], side="right")
        return float(np.mean(np.abs(counts / len(x) - CE_LEVELS)))
    if np.isfinite(dof):  # PIT <= p  <=>  z <= the dof's p-quantile (monotone)
        order = np.argsort(np.asarray(z, dtype=float), kind="stable")
        x = np.asarray(z, dtype=float)[order] / scale
        cw = np.concatenate([[0.0], np.cumsum(np.ones(len(x)) if weight is None else np.asarray(weight, dtype=float)[order])])
        counts = np.searchsorted(x, _z_of(dof)[1], side="right")
        return float(np.mean(np.abs(cw[counts] / cw[-1] - CE_LEVELS)))
    if weight is not None:
        order = np.argsort(np.asarray(z, dtype=float), kind="stable")
        x = np.asarray(z, dtype=float)[order] / scale
        cw = np.concatenate([[0.0], np.cumsum(np.asarray(weight, dtype=float)[order])])
        # rows with PIT <= p are a prefix of the sorted rows (ndtr is monotone)
        counts = np.searchsorted(ndtr(x), CE_LEVELS, side="right")
        return float(np.mean(np.abs(cw[counts] / cw[-1] - CE_LEVELS)))
    x = np.sort(np.asarray(z, dtype=float) / scale)
    # count(PIT <= p) without the PIT of every row (the factor search calls this ~600x per shard):
    # on sorted rows the count is where PIT first exceeds p; start at the z-quantile of p and settle
    # the rows at that boundary with the PIT itself (ndtr, the ufunc norm.cdf evaluates; monotone),
    # so the counts are those of the PIT comparison
    counts = np.searchsorted(x, _CE_Z, side="right")
    for k, p in enumerate(CE_LEVELS):
        j = int(counts[k])
        while j > 0 and ndtr(x[j - 1]) > p:
            j -= 1
        while j < len(x) and ndtr(x[j]) <= p:
            j += 1
        counts[k] = j
    return float(np.mean(np.abs(counts / len(x) - CE_LEVELS)))


def block_groups(xy_m: np.ndarray, *, block_m: float, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold (0 .. n_folds - 1) of every row: square blocks of side `block_m`, blocks dealt to folds
    at random. A cell inside one block falls back to random folds over its rows."""
    keys = np.floor(np.asarray(xy_m) / block_m).astype(np.int64)
    _, block = np.unique(keys, axis=0, return_inverse=True)
    block = block.reshape(-1)
    n_blocks = int(block.max()) + 1
    if n_blocks < n_folds:
        return rng.integers(0, n_folds, len(block))
    fold_of_block = rng.permutation(np.arange(n_blocks) % n_folds)
    return fold_of_block[block]


def distance_bin(dist_m: np.ndarray, edges_m: tuple[float, ...] | None = None) -> np.ndarray:
    """Index into `edges_m` (default DIST_EDGES_M) of every distance (metres)."""
    edges = np.asarray(DIST_EDGES_M if edges_m is None else edges_m)
    return np.searchsorted(edges, np.asarray(dist_m, dtype=float), side="right") - 1


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([np.full(c, v) for v, _, c in blocks])


def _equal_set_weights(sets: list[tuple[np.ndarray, ...]], bins: list[np.ndarray], pooled_w: np.ndarray | None
                       ) -> np.ndarray | None:
    """Row weights of the pooled rows under BIN_SET_WEIGHTS "equal_far": in every bin k >= 1, the sets with at
    least MIN_ROWS_BIN rows there scaled to the mean of their total weights (the bin's total kept); other rows as
    given (None: 1). None back when no row changes (bit for bit "pooled")."""
    base = [s[4] if len(s) > 4 else np.ones(len(s[0])) for s in sets]
    scale = [np.ones(len(s[0])) for s in sets]
    changed = False
    for k in range(1, max((int(b.max()) for b in bins if len(b)), default=0) + 1):
        members = [j for j, b in enumerate(bins) if np.count_nonzero(b == k) >= MIN_ROWS_BIN]
        if len(members) < 2:
            continue
        totals = np.array([base[j][bins[j] == k].sum() for j in members])
        for j, tot in zip(members, totals):
            scale[j][bins[j] == k] = totals.mean() / tot
        changed = True
    if not changed:
        return pooled_w
    return np.concatenate([b * f for b, f in zip(base, scale)])


def interval_scales_by_distance(sets: list[tuple[np.ndarray, ...]], *, seed: int = 0,
                                edges_m: tuple[float, ...] | None = None, dof: float = np.inf,
                                aleatoric: float | None = None,
                                near: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(epistemic factor per DIST_EDGES_M bin, aleatoric factor) from sets of held-out rows
    (error, latent variance, noise variance, distance to the nearest row predicted from[, row
    weight]); (ones, 1) with too few rows. With row weights every share in the objective is
    weighted (`interval_error_z`). `aleatoric` given: that aleatoric factor is kept and only the
    epistemic factors are fitted (RANDOM_CV "kfold_split"; returned as given, also with too few
    rows). `near` given (with `aleatoric`; RANDOM_CV "kfold_split_far"): factors of bins 0 .. len(near) - 1
    kept as given, the farther bins fitted, made non-decreasing among themselves and clipped below at
    near[-1] (the least-squares isotonic fit with the near bins held); thin far bins take the nearest
    valid bin below (the seam bin if none). See the module docstring."""
    rng = np.random.default_rng(seed)
    edges = DIST_EDGES_M if edges_m is None else edges_m
    n_bins = len(edges)
    sets = [tuple(np.asarray(a, dtype=float) for a in s) for s in sets if len(s[0])]
    if near is not None:
        near = np.asarray(near, dtype=float)
        if aleatoric is None or not 1 <= len(near) <= n_bins:
            raise ValueError("near needs the aleatoric factor and 1 .. len(edges) bins")
    if not sets or sum(len(s[0]) for s in sets) < MIN_ROWS:
        if near is not None:
            return np.concatenate([near, np.full(n_bins - len(near), near[-1])]), float(aleatoric)
        return np.ones(n_bins), (1.0 if aleatoric is None else float(aleatoric))
    sets = [tuple(a[keep] for a in s) for s in sets
            for keep in [np.sort(rng.choice(len(s[0]), MAX_ROWS_PER_SET, replace=False)) if len(s[0]) > MAX_ROWS_PER_SET
                         else slice(None)]]
    bins = [distance_bin(s[3], edges) for s in sets]
    pooled = tuple(np.concatenate([s[k] for s in sets]) for k in range(3))
    pooled_bin = np.concatenate(bins)
    log_grid = np.abs(np.log(SCALE_GRID))

    def z_of(s, b, f_ep, f_al):
        return s[0] / np.sqrt(f_ep[b] ** 2 * s[1] + f_al**2 * s[2])

    def wt(s):
        return s[4] if len(s) > 4 else None

    pooled_w = np.concatenate([s[4] for s in sets]) if all(len(s) > 4 for s in sets) else None
    if BIN_SET_WEIGHTS == "equal_far":
        pooled_w = _equal_set_weights(sets, bins, pooled_w)

    f_ep, f_al = np.ones(n_bins), (1.0 if aleatoric is None else float(aleatoric))
    counts = np.bincount(pooled_bin, minlength=n_bins)
    # with the aleatoric factor fixed the bins are independent: one pass is the fixed point
    for _ in range(DESCENT_ROUNDS if aleatoric is None else 1):
        if aleatoric is None:
            f_al = float(SCALE_GRID[int(np.argmin([np.mean([interval_error_z(z_of(s, b, f_ep, f), weight=wt(s), dof=dof)
                                                            for s, b in zip(sets, bins)])
                                                   + FACTOR_PULL * lg for f, lg in zip(SCALE_GRID, log_grid)]))])
        for k in np.flatnonzero(counts >= MIN_ROWS_BIN):
            sel = pooled_bin == k
            rows = tuple(a[sel] for a in pooled)
            rw = None if pooled_w is None else pooled_w[sel]
            f_ep[k] = SCALE_GRID[int(np.argmin([interval_error_z(rows[0] / np.sqrt(f**2 * rows[1] + f_al**2 * rows[2]), weight=rw, dof=dof)
                                                + FACTOR_PULL * lg for f, lg in zip(SCALE_GRID, log_grid)]))]
    valid = counts >= MIN_ROWS_BIN
    if near is not None:  # bins 0 .. m kept; the far bins isotonic among themselves, clipped at the seam
        m = len(near) - 1
        f_ep[: m + 1] = near
        far = valid.copy()
        far[: m + 1] = False
        if far.any():
            f_ep[far] = np.maximum(_isotonic(f_ep[far], counts[far]), near[-1])
        for k in range(m + 1, n_bins):  # thin far bins: the nearest bin below (kept or valid)
            if not far[k]:
                f_ep[k] = f_ep[k - 1]
        return f_ep, f_al
    if not valid.any():
        return np.ones(n_bins), f_al
    f_ep[valid] = _isotonic(f_ep[valid], counts[valid])
    first, last = np.flatnonzero(valid)[[0, -1]]
    # thin bins, in increasing distance: the nearest valid bin below (f_ep[k - 1] is it, or a thin bin that took it);
    # before the first valid bin NEAR_EMPTY, after the last one FAR_EMPTY
    for k in np.flatnonzero(~valid):
        if k < first:
            f_ep[k] = min(1.0, f_ep[first]) if NEAR_EMPTY == "unit" else f_ep[first]
        elif k > last and FAR_EMPTY == "unit":
            f_ep[k] = max(1.0, f_ep[last])
        else:
            f_ep[k] = f_ep[k - 1]
    return f_ep, f_al


def held_out_objective(sets: list[tuple[np.ndarray, ...]], f_ep: np.ndarray, f_al: float, dof: float,
                       extra_var: list[np.ndarray] | None = None) -> float:
    """The objective the interval factors minimise: the mean over held-out sets (error, latent variance, noise
    variance, distance to the nearest row[, row weight]) of `interval_error_z` of the errors over the calibrated std
    (epistemic factor of each row's distance bin, aleatoric factor), `extra_var` (one array per set) added to its
    variance."""
    out = []
    for j, s in enumerate(sets):
        var = f_ep[distance_bin(s[3])] ** 2 * s[1] + f_al**2 * s[2]
        if extra_var is not None:
            var = var + extra_var[j]
        out.append(interval_error_z(s[0] / np.sqrt(var), weight=s[4] if len(s) > 4 else None, dof=dof))
    return float(np.mean(out))


def tail_fits(sets: list[tuple[np.ndarray, ...]], *, seed: int = 0,
              dofs: tuple[float, ...] | None = None) -> list[tuple[float, np.ndarray, float, float]] | None:
    """(objective, epistemic factor per distance bin, aleatoric factor, dof) for every dof of `dofs` (default DOF_GRID
    under TAIL_MODE "t", (inf,) under "gauss"), searched from inf down: `interval_scales_by_distance` for the dof,
    scored by `held_out_objective`; None with fewer than MIN_ROWS rows."""
    grid = (DOF_GRID if TAIL_MODE == "t" else (np.inf,)) if dofs is None else dofs
    sets = [tuple(np.asarray(a, dtype=float) for a in s) for s in sets if len(s[0])]
    if not sets or sum(len(s[0]) for s in sets) < MIN_ROWS:
        return None
    out = []
    for dof in sorted(grid, reverse=True):
        f_ep, f_al = interval_scales_by_distance(sets, seed=seed, dof=dof)
        out.append((held_out_objective(sets, f_ep, f_al, dof), f_ep, f_al, float(dof)))
    return out


def best_tail(fits: list[tuple[float, np.ndarray, float, float]] | None) -> tuple[np.ndarray, float, float]:
    """(epistemic factors, aleatoric factor, dof) of the lowest objective among `tail_fits` (the first of equals: ties
    keep the lighter tail); (ones, 1, inf) for None (too few rows)."""
    if fits is None:
        return np.ones(len(DIST_EDGES_M)), 1.0, float(np.inf)
    _, f_ep, f_al, dof = min(fits, key=lambda f: f[0])
    return f_ep, f_al, dof


def interval_scales_tail(sets: list[tuple[np.ndarray, ...]], *, seed: int = 0,
                         dofs: tuple[float, ...] | None = None) -> tuple[np.ndarray, float, float]:
    """(epistemic factor per distance bin, aleatoric factor, dof): `interval_scales_by_distance`
    for every dof of `dofs` (default DOF_GRID under TAIL_MODE "t", (inf,) under "gauss"); the dof
    whose fitted factors give the lowest mean over the sets of `interval_error_z` wins (strictly
    lower: ties keep the lighter tail, the grid is searched from inf down)."""
    return best_tail(tail_fits(sets, seed=seed, dofs=dofs))


def far_tail(block: tuple[np.ndarray, ...], f_ep: np.ndarray, f_al: float, m: int, *, seed: int = 0,
             dofs: tuple[float, ...] = DOF_CANDIDATES, edges_m: tuple[float, ...] | None = None) -> tuple[np.ndarray, float | None]:
    """(epistemic factor per bin, dof of the far bins) for calibration.FAR_DOF: the block set's rows (error, latent
    variance, noise variance, distance[, row weight]) in bins m+1 .. last; for every dof of `dofs` the far bins'
    factors are refitted on the block set with `f_al` and bins 0..m held (`interval_scales_by_distance(near=...)`),
    and the dof whose far rows' `interval_error_z` is lowest wins (searched from inf down, strictly lower: ties keep
    the lighter tail). (f_ep, None) unchanged with fewer than MIN_ROWS_BIN far rows or no far bin."""
    edges = DIST_EDGES_M if edges_m is None else edges_m
    block = tuple(np.asarray(a, dtype=float) for a in block)
    far = distance_bin(block[3], edges) > m
    if m + 1 >= len(edges) or far.sum() < MIN_ROWS_BIN:
        return np.asarray(f_ep, dtype=float), None
    rows = tuple(a[far] for a in block)
    best = None
    for d in sorted(dofs, reverse=True):
        g, _ = interval_scales_by_distance([block], seed=seed, edges_m=edges, dof=d, aleatoric=f_al, near=f_ep[: m + 1])
        z = rows[0] / np.sqrt(g[distance_bin(rows[3], edges)] ** 2 * rows[1] + f_al**2 * rows[2])
        val = interval_error_z(z, weight=rows[4] if len(rows) > 4 else None, dof=d)
        if best is None or val < best[0]:
            best = (val, g, float(d))
    return best[1], best[2]


def interval_scales_support(sets: list[tuple[np.ndarray, ...]], *, seed: int = 0,
                            slopes: np.ndarray | None = None) -> tuple[float, float, float]:
    """(a, b, aleatoric factor) of the epistemic factor a exp(b v) from held-out sets of rows
    (error, latent variance, noise variance, v = latent / prior latent variance[, row weight]): coordinate
    descent on the mean over the sets of `interval_error_z` (+ FACTOR_PULL towards a = 1, b = 0);
    (1, 0, 1) with too few rows. `slopes` defaults to SLOPE_GRID (pass (0,) for one factor)."""
    rng = np.random.default_rng(seed)
    slopes = SLOPE_GRID if slopes is None else np.asarray(slopes, dtype=float)
    sets = [tuple(np.asarray(x, dtype=float) for x in st[:5]) for st in sets if len(st[0])]
    if not sets or sum(len(st[0]) for st in sets) < MIN_ROWS:
        return 1.0, 0.0, 1.0
    sets = [tuple(x[keep] for x in st) for st in sets
            for keep in [np.sort(rng.choice(len(st[0]), MAX_ROWS_PER_SET, replace=False)) if len(st[0]) > MAX_ROWS_PER_SET
                         else slice(None)]]
    log_grid = np.abs(np.log(SCALE_GRID))

    def objective(a: float, b: float, f_al: float) -> float:
        return float(np.mean([interval_error_z(st[0] / np.sqrt((a * np.exp(b * st[3])) ** 2 * st[1] + f_al**2 * st[2]),
                                               weight=st[4] if len(st) > 4 else None) for st in sets]))

    a, b, f_al = 1.0, 0.0, 1.0
    for _ in range(DESCENT_ROUNDS):
        f_al = float(SCALE_GRID[int(np.argmin([objective(a, b, f) + FACTOR_PULL * lg for f, lg in zip(SCALE_GRID, log_grid)]))])
        best = (np.inf, a, b)
        for bb in slopes:
            for aa, lg in zip(SCALE_GRID, log_grid):
                val = objective(float(aa), float(bb), f_al) + FACTOR_PULL * (lg + bb)
                if val < best[0]:
                    best = (val, float(aa), float(bb))
        a, b = best[1], best[2]
    return a, b, f_al


def site_factors(sets: list[tuple[np.ndarray, ...]], f_ep: np.ndarray, f_al: float, dof: float, *,
                 edges_m: tuple[float, ...] | None = None) -> np.ndarray:
    """Factor on the whole predictive std per SITE_EDGES_M bin of the distance to the site, given
    the fitted factors: per bin the SCALE_GRID value minimising the mean over the sets (those with
    at least MIN_ROWS_BIN rows in the bin) of `interval_error_z` of the bin's rows (+ FACTOR_PULL
    towards 1). Sets: (error, latent variance, noise variance, distance to the nearest row,
    distance to the site[, row weight]). Bins with too few rows take the nearest valid bin's
    factor (1 when none); one bin: 1."""
    edges = SITE_EDGES_M if edges_m is None else edges_m
    out = np.ones(len(edges))
    if len(edges) == 1:
        return out
    sets = [tuple(np.asarray(a, dtype=float) for a in st) for st in sets if len(st[0])]
    log_grid = np.abs(np.log(SCALE_GRID))
    valid = np.zeros(len(edges), dtype=bool)
    for k in range(len(edges)):
        parts = []
        for st in sets:
            sel = distance_bin(st[4], edges) == k
            if sel.sum() >= MIN_ROWS_BIN:
                z = st[0][sel] / np.sqrt(f_ep[distance_bin(st[3][sel])] ** 2 * st[1][sel] + f_al**2 * st[2][sel])
                parts.append((z, st[5][sel] if len(st) > 5 else None))
        if parts:
            valid[k] = True
            out[k] = SCALE_GRID[int(np.argmin([np.mean([interval_error_z(z / f, weight=w, dof=dof) for z, w in parts])
                                               + FACTOR_PULL * lg for f, lg in zip(SCALE_GRID, log_grid)]))]
    if valid.any():
        idx = np.flatnonzero(valid)
        for k in np.flatnonzero(~valid):
            out[k] = out[idx[np.argmin(np.abs(idx - k))]]
    return out
