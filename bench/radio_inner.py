"""Nested comparison harness of radio model variants: the outer split's TRAINING rows only.

How design alternatives of the radio model are chosen (issue 14 item 3): the outer split of
`bench/radio_real.py` (same dataset, same seed) is made, its held-out rows are dropped before
anything else, and the same split procedure is applied again to the remaining rows with another
seed (random 65/35 per cell, or 200 m blocks with 35% held out). Our model is fitted on the inner
training rows and scored on the inner held-out rows: pooled / median-cell MAE, CE, cov50/cov90,
epistemic std at training positions and 3 km out. No outer held-out row is read, so a choice
made here is a choice by cross-validation inside the training rows.

A variant sets module constants of the radio model before the fit (VARIANTS below). Results are
merged into bench/results/radio_inner.json (key: dataset/split/variant).

Usage:
    python bench/radio_inner.py --dataset purdue-5g --splits random,blocks --variants flat,support --max-cells 40
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import radio_real as rr  # noqa: E402

# Seed offset of the inner split (any value other than 0 gives a split independent of the outer one).
INNER_SEED_OFFSET = 1000
# The session-13 default with every constant named (session 14): the base of the later rules' variants.
S13_CALIBRATION = {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3, "MEAN_SHIFT": True, "SHIFT_WEIGHTED_ONLY": True,
                   "DIST_EDGES_M": (0.0, 15.0, 40.0, 100.0, 250.0), "NEAR_EMPTY": "first",
                   "FAR_EMPTY": "last"}
# PATCH_FLAT_RMS_M 0: the variants before session 40 keep their meaning now that the default has it at 100 (rule AB;
# "s40_patch_flat" is the default since then)
S13_GEOMETRY = {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}


def _on_s13(**calibration) -> dict:
    """A variant: the session-13 default with the given calibration constants set (no forest in the mean's stack:
    stacking.TREE_STACK off, the default from session 17's rule T' on)."""
    return {"calibration": {**S13_CALIBRATION, **calibration}, "geometry": dict(S13_GEOMETRY),
            "stacking": {"TREE_STACK": False}}


def _with_tree(fade: bool) -> dict:
    """The session-13 default plus the forest in the mean's stack (session 17: rule T, and with `fade` rule T')."""
    return {**_on_s13(), "stacking": {"TREE_STACK": True, "TREE_FADE": fade}}


# Variants: {module: {constant: value}} set on cellsynth.radio.<module> before fitting.
VARIANTS = {
    "flat": {"stacking": {"BLEND_MODE": "flat"}, "calibration": {"EP_MODE": "flat"}},
    "support": {"stacking": {"BLEND_MODE": "support"}, "calibration": {"EP_MODE": "support"}},
    "blend_support_only": {"stacking": {"BLEND_MODE": "support"}, "calibration": {"EP_MODE": "flat"}},
    "ep_support_only": {"stacking": {"BLEND_MODE": "flat"}, "calibration": {"EP_MODE": "support"}},
    "noknn": {"stacking": {"BLEND_MODE": "flat", "W_GRID": (0.0,)}, "calibration": {"EP_MODE": "flat"}},
    "noknn_ep_support": {"stacking": {"BLEND_MODE": "flat", "W_GRID": (0.0,)}, "calibration": {"EP_MODE": "support"}},
    # session 7: row weights (CellData.row_weight). "unweighted": no row weights at all (the model
    # before); w0 / w05 / w1: weighted objectives, GP noise power gamma = 0 / 0.5 / 1.
    "unweighted": {},
    "w0": {"model": {"ROW_WEIGHT_POWER": 0.0}},
    "w05": {"model": {"ROW_WEIGHT_POWER": 0.5}},
    "w1": {"model": {"ROW_WEIGHT_POWER": 1.0}},
    # session 7: the far-field term of farfield.py (half-plane extrapolation CV), on top of a gamma
    "w0_far": {"model": {"ROW_WEIGHT_POWER": 0.0}, "farfield": {"FAR_MODE": "halfplane"}},
    "w05_far": {"model": {"ROW_WEIGHT_POWER": 0.5}, "farfield": {"FAR_MODE": "halfplane"}},
    "w1_far": {"model": {"ROW_WEIGHT_POWER": 1.0}, "farfield": {"FAR_MODE": "halfplane"}},
    # session 8: shape of the predictive (calibration.TAIL_MODE): Gaussian, or Student-t with the
    # dof per shard chosen from DOF_GRID by the training-row objective; "t6": dof fixed at 6
    "gauss": {"calibration": {"TAIL_MODE": "gauss"}},
    "t": {"calibration": {"TAIL_MODE": "t", "DOF_GRID": (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, float("inf"))}},
    "t6": {"calibration": {"TAIL_MODE": "t", "DOF_GRID": (6.0,)}},
    # session 9: the random held-out set of the calibration (calibration.RANDOM_CV): closed-form
    # leave-one-out, or random folds with the whole fit redone per fold (3 or 5 folds)
    "loo": {"calibration": {"RANDOM_CV": "loo"}},
    "rfold3": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 3}},
    "rfold5": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 5}},
    # session 9: a factor on the whole std per bin of the distance to the site (calibration.SITE_EDGES_M)
    "site": {"calibration": {"SITE_EDGES_M": (0.0, 100.0, 300.0, 1000.0)}},
    "rfold3_site": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 3, "SITE_EDGES_M": (0.0, 100.0, 300.0, 1000.0)}},
    # the dof again, on the refitted random folds: per shard from DOF_CANDIDATES, or fixed at 4
    "rfold3_t": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 3,
                                 "DOF_GRID": (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, float("inf"))}},
    "rfold3_t4": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 3, "DOF_GRID": (4.0,)}},
    # the kNN weight of the mean from the refitted sets (3 random folds + blocks), intervals as before (LOO + blocks)
    "rfold3_mean": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3}},
    # session 10: the log-distance term near the site (geometry.SITE_HEIGHT_M / SITE_SPREAD): the
    # 3-D distance with a 25 m antenna height, plus the estimated site's spread (on rfold3_mean;
    # the default since session 10, rule E); "h0_nospread": the 2-D distance of the model before
    "h0_nospread": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3},
                    "geometry": {"SITE_HEIGHT_M": 0.0, "SITE_SPREAD": False, "PATCH_FLAT_RMS_M": 0.0}},
    "h25_spread": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3},
                   "geometry": {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}},
    # session 11: the interval factors on the refitted random folds + blocks (RANDOM_CV "kfold",
    # no leave-one-out set) on the session-10 mean (rule F)
    "h25_rfold3": {"calibration": {"RANDOM_CV": "kfold", "RANDOM_FOLDS": 3},
                   "geometry": {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}},
    # session 11: one constant per shard on the mean from the refitted held-out sets' weighted errors (rule G)
    "h25_shift": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3, "MEAN_SHIFT": True},
                  "geometry": {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}},
    # session 12: one epistemic factor per bin of the distance to the nearest training row
    # (calibration.DIST_EDGES_M, the edges in its comment) on the session-12 default (rule H)
    "h25_shift_dist": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3, "MEAN_SHIFT": True,
                                       "DIST_EDGES_M": (0.0, 15.0, 40.0, 100.0, 250.0)},
                       "geometry": {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}},
    # session 13: the shift fitted on and added to only the cells whose row weights differ
    # (calibration.SHIFT_WEIGHTED_ONLY) on the session-12 default (rule I)
    "h25_shift_wonly": {"calibration": {"RANDOM_CV": "kfold_mean", "RANDOM_FOLDS": 3, "MEAN_SHIFT": True,
                                        "SHIFT_WEIGHTED_ONLY": True},
                        "geometry": {"SITE_HEIGHT_M": 25.0, "SITE_SPREAD": True, "PATCH_FLAT_RMS_M": 0.0}},
    # session 14: the session-13 default with every constant named ("h25_shift_wonly" ran in session 13 before
    # DIST_EDGES_M was on, so that name now means a different model than its record)
    "s13_default": _on_s13(),
    # session 14 (rule J): the interval factors on the refitted random folds (RANDOM_CV "kfold") instead of the
    # closed-form leave-one-out, now that the epistemic factor has distance bins; 3 folds (the set "kfold_mean"
    # already computes for the mean) or 5 (closer to a test row's density), on the session-13 default
    "wonly_ivl_rfold3": _on_s13(RANDOM_CV="kfold"),
    "wonly_ivl_rfold5": _on_s13(RANDOM_CV="kfold", RANDOM_FOLDS=5),
    # session 15 (rule K): the aleatoric factor and dof as the default fits them (leave-one-out + blocks: the rows
    # next to their neighbours identify the noise), the epistemic distance bins refitted on the refitted random
    # folds + blocks with that aleatoric factor fixed (RANDOM_CV "kfold_split"); the mean is the default's
    "s15_ivl_split": _on_s13(RANDOM_CV="kfold_split"),
    # session 16 (rule L): as s15_ivl_split, but the bins up to the one holding the median leave-one-out row's distance
    # keep the default's factors (K's ratio fell through the nearest bins); only the farther bins refitted
    "s16_ivl_far": _on_s13(RANDOM_CV="kfold_split_far"),
    # session 16 (rule M): the default plus a dof for the far distance bins (beyond the median leave-one-out
    # distance's bin) and their factors, both from the block set's far rows (calibration.FAR_DOF)
    "s16_far_dof": _on_s13(FAR_DOF=True),
    # session 17 (rule T): the default plus a per-cell forest of regression trees on the kNN's residuals as a third
    # component of the mean's stack, its weight per shard on the kNN weight's held-out sets (stacking.TREE_STACK)
    "s17_tree": _with_tree(False),
    # session 17 (rule T'): s17_tree with the forest's term faded by exp(-(d / 15 m)^2), d the distance to the nearest
    # training row, and a forest only for cells with >= 100 training rows (stacking.TREE_FADE)
    "s17_tree_fade": _with_tree(True),
    # the default from session 17 (rule T' adopted) to session 20: s17_tree_fade
    "s17_default": _with_tree(True),
    # session 18 (rule F): the default with every refitted fold on the cell's own hyperparameters (no grid search per
    # fold: foldcv.FOLD_THETA "cell"), for the fit's CPU
    "s18_fold_theta": {**_with_tree(True), "foldcv": {"FOLD_THETA": "cell"}},
    # session 18 (rule F'): the default with only the random folds (the mean's stack set under "kfold_mean") on the
    # cell's own hyperparameters; block folds refit them (foldcv.FOLD_THETA "cell_random")
    "s18_fold_theta_random": {**_with_tree(True), "foldcv": {"FOLD_THETA": "cell_random"}},
    # session 21 (rule N): distance bins nearer than every bin with calibration rows take min(1, the first valid
    # bin's factor) instead of that factor (calibration.NEAR_EMPTY "unit")
    "s21_near_unit": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit"}},
    # the default from session 21 (rule N adopted): s21_near_unit
    "s21_default": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit"}},
    # session 21 (rule O): the interval factors on the leave-one-out, block and random-fold sets together
    # (calibration.RANDOM_CV "kfold_all"; the mean as "kfold_mean"), on the default and on N
    "s21_ivl_all": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_all"}},
    "s21_near_unit_ivl_all": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_all",
                                                                  "NEAR_EMPTY": "unit"}},
    # session 22 (rule P): rule K (the epistemic distance bins refitted on the refitted random folds + blocks, the
    # aleatoric factor and dof held; calibration.RANDOM_CV "kfold_split") on the session-21 default (rule N on)
    "s22_split_unit": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_split",
                                                           "NEAR_EMPTY": "unit"}},
    # session 22 (rule Q): thin distance bins beyond every bin with calibration rows take max(1, the last valid
    # bin's factor) instead of that factor (calibration.FAR_EMPTY "unit"), on the default and on P
    "s22_far_unit": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "FAR_EMPTY": "unit"}},
    "s22_split_far_unit": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_split",
                                                               "NEAR_EMPTY": "unit", "FAR_EMPTY": "unit"}},
    # session 22 (rule R): P with the first distance bin (0-15 m) keeping the default's factor, the farther bins refitted
    # (calibration.RANDOM_CV "kfold_split_first")
    "s22_split_first": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_split_first",
                                                            "NEAR_EMPTY": "unit"}},
    # session 22 (rule S): R, then per distance bin the larger of R's factor and the default's
    # (calibration.RANDOM_CV "kfold_split_first_max")
    "s22_split_first_max": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "RANDOM_CV": "kfold_split_first_max",
                                                                "NEAR_EMPTY": "unit"}},
    # the default from session 22 on (unchanged since rule N): s21_default under its session-24 name
    "s24_default": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled"}},
    # session 24 (rule U): every held-out set with rows in a distance bin beyond the first carries the same total weight
    # in that bin's epistemic factor (calibration.BIN_SET_WEIGHTS "equal_far")
    "s24_bin_equal": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit",
                                                          "BIN_SET_WEIGHTS": "equal_far"}},
    # session 26 (rule V): the log-distance slope's prior centred on the shard's median least-squares slope instead of the
    # cell's own (geometry.SLOPE_PRIOR "shard"), on the default; "s26_default": the default with that constant named.
    # Rule V, written before its run: fresh inner seeds 37-39, all cells, outer seed 42, the pairs purdue-5g, ucc-5g and
    # uav-lte x random, blocks; s26_slope_shard against s26_default on the same splits. Adopt iff (1) the mean pooled
    # MAE over the six pairs is lower; (2) no pair's pooled MAE (mean over the seeds) is higher by more than 0.02 dB;
    # (3) the mean median-cell MAE over the pairs is not higher; (4) the mean interval score is not higher by more than
    # 0.005; (5) the mean over the pairs of the ratio epistemic 3 km / training is not lower by more than 3%.
    "s26_default": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled"},
                    "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    "s26_slope_shard": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled"},
                        "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "shard"}},
    # session 28 (rule W): the predictive's dof chosen per shard from calibration.DOF_CANDIDATES by the training-row
    # objective (DOF_GRID = DOF_CANDIDATES) instead of fixed at 6; "s28_default": the default with DOF_GRID named.
    # Why now: session 8 fixed 6 on UCC and Purdue only; inside the training rows of the UAV flights (added in session
    # 26) the default's 50% intervals cover 0.58 at 90% coverage 0.90 (s26_default~s3@from37, uav-lte random), a
    # shape no factor on a t6 can fix. Rule W, written before its run: fresh inner seeds 43-45, all cells, outer seed
    # 42, the six pairs purdue-5g, ucc-5g, uav-lte x random, blocks; s28_dof_shard against s28_default on the same
    # splits. Adopt iff (1) the mean interval score over the six pairs is lower at each of the three seeds; (2) no
    # pair's pooled MAE moves by more than 0.001 dB (the dof does not enter the mean); (3) on no pair the 3-seed mean
    # |cov50 - 0.5| or |cov90 - 0.9| is larger than the default's by more than 0.01; (4) the mean over the pairs of
    # the ratio epistemic 3 km / training is not lower by more than 3% and the 3 km std stays <= 25 dB; (5) the
    # known-noise world's median aleatoric std (bench/radio_known_noise.py, mode "kfold_mean+tree_fade+near_unit+dof_shard")
    # is within 0.05 dB of the default's.
    # Outcome of W (radio_inner.json "s28_dof_shard~s3@from43" against "s28_default~s3@from43"): clauses 1-3 and 5 held
    # (interval score lower at every seed, 0.098 / 0.154 / 0.144 -> 0.084 / 0.144 / 0.133; MAE identical; known-noise
    # aleatoric 1.695 -> 1.694 dB), clause 4 failed: the mean ratio 26.7 -> 18.8x, all of it UAV random (84.8 -> 37.4x;
    # every other pair within -7% .. +7%). Rejected as written.
    # Rule W' (written after W's outcome, before its run; said plainly): the same two variants on fresh inner seeds
    # 46-48, clauses 1, 2, 3 and 5 of W unchanged, clause 4 replaced by the issue's own per-pair target: (4') the 3 km
    # std stays <= 25 dB, and on every pair where the default's ratio epistemic 3 km / training (3-seed mean) is >= 10x
    # the variant's is >= 10x, and where the default's is below 10x the variant's is not lower by more than 3%. Why: a
    # mean of ratios over the pairs weighs a pair at 85x by its excess over the issue's 10x, which no criterion of the
    # issue values; the per-pair form keeps what the issue asks of every pair.
    "s28_default": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                        "TAIL_MODE": "t", "DOF_GRID": (6.0,)},
                    "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    # session 28 (rule X): a position-error term on the aleatoric variance, sigma^2 |grad m|^2 from the log-distance
    # term's radial gradient, sigma per shard from calibration.POSITION_SIGMA_GRID_M by the interval objective on the
    # held-out sets (calibration.POSITION_NOISE). Why: inside the training rows of Purdue's random split (inner seed
    # 49, a diagnostic seed, training rows only) the default covers 0.65 at 90% within 100 m of the strongest decile's
    # centre, 0.79 at 100-300 m and 0.91 beyond, with MAE 5.0 / 3.9 / 3.1 dB and the same predictive std: near the site
    # a 55 m grid square spans many dB of the path-loss slope. Rule X, written before its run: fresh inner seeds
    # 50-52, all cells, outer seed 42, six pairs; s28_pos_noise against s28_default on the same splits; adopt iff W''s
    # clauses hold: (1) the mean interval score over the six pairs lower at each seed; (2) no pair's pooled MAE moves by
    # more than 0.001 dB; (3) on no pair the 3-seed mean |cov50 - 0.5| or |cov90 - 0.9| larger by more than 0.01; (4)
    # 3 km std <= 25 dB, and per pair the ratio epistemic 3 km / training >= 10x where the default's is, else not lower
    # by more than 3%; (5) the known-noise world's median aleatoric std (mode
    # "kfold_mean+tree_fade+near_unit+pos_noise") within 0.05 dB of the default's.
    "s28_pos_noise": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                          "TAIL_MODE": "t", "DOF_GRID": (6.0,), "POSITION_NOISE": True},
                      "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    "s28_dof_shard": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                          "TAIL_MODE": "t",
                                                          "DOF_GRID": (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, float("inf"))},
                      "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    # session 28, report only (no rule): the dof chosen once per dataset and split (one "run" of a target), not per
    # shard: a first pass records, for every shard, the training-row objective of each dof in DOF_CANDIDATES (the
    # factors fitted for it), the dof with the lowest row-weighted mean over the shards is kept, and a second pass fits
    # every shard with that dof (`run_pooled_dof`). The product has no such mode (a run-level choice would need the
    # radio stage to pick the dof after all shards are fitted); this emulates it to see whether it is worth building.
    # Rule Y (session 28), written after the report above and before its run: s28_dof_pooled against s28_default on
    # fresh inner seeds 53-55, all cells, outer seed 42, the six pairs; adopt (for building the run-level choice into
    # the radio stage) iff W''s clauses hold: (1) the mean interval score over the six pairs lower at each seed; (2) no
    # pair's pooled MAE moves by more than 0.001 dB; (3) on no pair the 3-seed mean |cov50 - 0.5| or |cov90 - 0.9|
    # larger by more than 0.01; (4) 3 km std <= 25 dB, and per pair the ratio epistemic 3 km / training >= 10x where the
    # default's is, else not lower by more than 3%; (5) the known-noise world's median aleatoric std within 0.05 dB of
    # the default's (its fit is one shard, so the pooled dof is the per-shard one: mode
    # "kfold_mean+tree_fade+near_unit+dof_shard", 1.694 against 1.695 dB, already recorded).
    "s28_dof_pooled": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                           "TAIL_MODE": "t", "DOF_GRID": (6.0,)},
                       "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    # session 30 (rule Z): the estimated site's displacement integrated out by the GP (geometry.SITE_TERM: N_SITE
    # basis columns, the log-distance term at a quadrature of site positions around the estimate, spread r).
    # Why: inside Purdue's training rows the 90% intervals cover 0.65 within 100 m of the estimated site (session
    # 28, inner seed 49) while leave-one-out covers 0.857 there; the stationary GP states no extra uncertainty where
    # an error of the site estimate moves the log-distance term most. Rule Z, written before its run: fresh inner
    # seeds 56-58, all cells, outer seed 42, the six pairs; s30_site_term against s28_default on the same splits.
    # Adopt iff (1) the mean interval score over the six pairs is lower at each seed; (2) the mean over the pairs of
    # the 3-seed pooled MAE is not higher, and no pair's is higher by more than 0.01 dB (the term moves the mean,
    # unlike W-Y); (3) on no pair the 3-seed mean |cov50 - 0.5| or |cov90 - 0.9| is larger by more than 0.01; (4) 3 km
    # std <= 25 dB, and per pair the ratio epistemic 3 km / training >= 10x where the default's is, else not lower
    # by more than 3%; (5) the known-noise world's median aleatoric std within 0.05 dB of the default's (its sites
    # are given, so r = 0 and the site columns are 0: mode "kfold_mean+tree_fade+near_unit+site_term").
    # Outcome of Z ("s30_site_term~s3@from56" against "s28_default~s3@from56"): clause 1 failed (interval score by seed
    # 0.0559 / 0.0957 / 0.0719 -> 0.0615 / 0.1035 / 0.0954), clause 2 failed (mean pooled MAE 3.610 -> 3.638 dB;
    # Purdue blocks +0.061, random +0.050, UCC blocks +0.047), clause 3 failed (UAV blocks |cov50 - 0.5| 0.033 ->
    # 0.070, |cov90 - 0.9| 0.022 -> 0.041; Purdue random's cov90 0.882 -> 0.875). Rejected; the known-noise record
    # was not run (its sites are given: identical by construction, and the rule had failed). Seeds 56-58 are spent.
    "s30_site_term": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                          "TAIL_MODE": "t", "DOF_GRID": (6.0,)},
                      "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell", "SITE_TERM": True}},
    # session 37 (rule AA): the leave-one-out set's errors scaled per cell by sqrt(n / (n - p)) before the interval
    # factors are fitted (calibration.LOO_SMALL_SAMPLE; p = 3 hyperparameters + 2 site coordinates where the site is
    # estimated, counted a priori). Why: bench/radio_real.py --max-train-rows (session 36, report only) put the 90%
    # intervals at 0.84-0.86 with 15-40 training rows per cell on random splits, and inside the outer training rows
    # the default does the same (diagnostic, inner seeds 59-61 at 15 rows, "s28_default~s3@from59@cap15": random cov90
    # 0.860 Purdue / 0.861 UCC, cov50 0.450 / 0.457); the leave-one-out set shares 3-5 numbers fitted with the
    # left-out row, a bias that grows as rows get few. Rule AA, written before the variant's first run: fresh inner
    # seeds 62-64, all cells, outer seed 42; s37_loo_small against s28_default on the same splits. Adopt iff
    # (1) at 15 and at 40 training rows per cell (--max-train-rows), the mean interval score over the four pairs
    # (UCC, Purdue x random, blocks) is lower at each seed; (2) at the radio stage's row cap, over the six pairs
    # (UAV too), the 3-seed mean interval score is not higher by more than 0.005; (3) no pair's pooled MAE moves by
    # more than 0.001 dB at any cap (the mean's weights never see the leave-one-out set); (4) at the stage's cap, on
    # no pair the 3-seed mean |cov50 - 0.5| or |cov90 - 0.9| is larger by more than 0.01; (5) at the stage's cap, 3 km
    # std <= 25 dB, and per pair the ratio epistemic 3 km / training >= 10x where the default's is, else not lower by
    # more than 3%; (6) the known-noise world's median aleatoric std (mode "kfold_mean+tree_fade+near_unit+loo_small")
    # within 0.05 dB of the default's.
    # Outcome of AA ("s37_loo_small~s3@from62[@cap15|@cap40]" against "s28_default~s3@from62[...]"): clause 1 failed at
    # both caps (interval score by seed at 15 rows 0.136 / 0.109 / 0.102 -> 0.084 / 0.081 / 0.118, at 40 rows 0.092 /
    # 0.082 / 0.089 -> 0.093 / 0.063 / 0.091; 3-seed means 0.116 -> 0.094 and 0.087 -> 0.082); clause 6 failed (known-
    # noise aleatoric 1.695 -> 1.629 dB: the factor fit moved variance from noise to the latent part); clauses 2-5 held
    # (six pairs 0.0959 -> 0.0954; MAE identical; Purdue random cov90 0.864 -> 0.873). At 15 rows the random splits'
    # cov90 came to 0.899-0.901 but cov50 overshot to 0.530-0.538: the held-out errors there are heavier-tailed than
    # the fixed dof 6 says, which one variance factor cannot fix. Rejected; seeds 62-64 are spent.
    "s37_loo_small": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                          "TAIL_MODE": "t", "DOF_GRID": (6.0,), "LOO_SMALL_SAMPLE": True},
                      "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell"}},
    # session 40 (rule AB): a flat prior mean where the site is estimated and the cell's rows sit in a patch of RMS
    # radius below 100 m (geometry.PATCH_FLAT_RMS_M, fixed a priori: two shadowing decorrelation lengths). Why: a
    # stress case (UCC cells trained on the rows within 60 m of a spot, scored 150-600 m out; a construction for
    # robustness, not a split of the benches) put the default 22-45 dB too low on some cells, pooled MAE 13.4 dB
    # against 8.7 for each cell's mean, 8.6 with the guard: the estimated site lies inside the patch and the
    # least-squares slope over tens of metres is extrapolated as a distance law. Inside the outer training rows
    # (seed 42) such cells are few (RMS radius < 100 m: UCC 6 / 8 of 79 / 67 cells, Purdue 0 / 0, UAV 22 / 18 of
    # 142 / 133, random / blocks), so the rule asks that the guard cost nothing where it does not bite. Rule AB,
    # written before its run: fresh inner seeds 65-67, all cells, outer seed 42, the six pairs; s40_patch_flat
    # against s28_default on the same splits. Adopt iff (1) the 3-seed mean interval score over the six pairs is not
    # higher by more than 0.005; (2) the mean over the pairs of the 3-seed pooled MAE is not higher, and no pair's is
    # higher by more than 0.01 dB; (3) the mean over the pairs of the 3-seed median-cell MAE is not higher by more
    # than 0.01 dB; (4) on no pair the 3-seed mean |cov50 - 0.5| or |cov90 - 0.9| is larger by more than 0.01;
    # (5) 3 km std <= 25 dB, and per pair the ratio epistemic 3 km / training >= 10x where the default's is, else
    # not lower by more than 3%. The known-noise world's sites are given, so its fits are identical by construction.
    # Outcome of AB ("s40_patch_flat~s3@from65" against "s28_default~s3@from65"): every clause held. (1) interval
    # score 0.0816 -> 0.0772 (by seed 0.0758 / 0.0809 / 0.0882 -> 0.0729 / 0.0745 / 0.0842); (2) mean pooled MAE
    # 3.431 -> 3.401 dB, the largest rise Purdue blocks +0.002 (UAV blocks 2.099 -> 1.988, UCC blocks 5.984 -> 5.915);
    # (3) median-cell MAE 3.235 -> 3.226; (4) the largest rise of |cov - nominal| 0.006 (UAV random cov90 0.893 ->
    # 0.887); (5) 3 km std <= 25 dB, ratios >= 10x where the default's were (UCC random 12.1 -> 11.0x, UAV random
    # 106 -> 59x), Purdue random 9.66 -> 9.66x. Adopted (geometry.PATCH_FLAT_RMS_M = 100); seeds 65-67 are spent.
    "s40_patch_flat": {**_with_tree(True), "calibration": {**S13_CALIBRATION, "NEAR_EMPTY": "unit", "BIN_SET_WEIGHTS": "pooled",
                                                           "TAIL_MODE": "t", "DOF_GRID": (6.0,)},
                       "geometry": {**S13_GEOMETRY, "SLOPE_PRIOR": "cell", "PATCH_FLAT_RMS_M": 100.0}},
}
UNWEIGHTED = ("unweighted",)  # variants whose fit gets no row weights
POOLED_DOF = ("s28_dof_pooled",)  # variants fitted by `run_pooled_dof`
DEFAULT_OUT = Path(__file__).parent / "results" / "radio_inner.json"


def run_pooled_dof(rows: list[dict], cells: list[str], **kw) -> dict:
    """`rr.run_ours` with one dof for all shards (variants in POOLED_DOF): pass 1 fits with DOF_GRID = DOF_CANDIDATES
    and records per shard and dof the objective `calibration.interval_scales_tail` minimises (its factors fitted for
    that dof) and the shard's held-out rows; the dof with the lowest row-weighted mean objective over the shards
    (searched from inf down, strictly lower: ties keep the lighter tail) is then fixed (DOF_GRID = (dof,)) for pass 2,
    whose predictions are returned with "dof_pooled"."""
    import cellsynth.radio.calibration as cal

    seen: list[tuple[int, dict[float, float]]] = []
    original = cal.interval_scales_tail

    def recording(sets, *, seed=0, dofs=None):  # the shard's fit, with every dof's objective kept
        fits = cal.tail_fits(sets, seed=seed, dofs=dofs)
        if fits is not None:
            seen.append((sum(len(st[0]) for st in sets), {dof: val for val, _, _, dof in fits}))
        return cal.best_tail(fits)

    old_grid = cal.DOF_GRID
    cal.interval_scales_tail, cal.DOF_GRID = recording, tuple(cal.DOF_CANDIDATES)
    try:
        rr.run_ours(rows, cells, **kw)
    finally:
        cal.interval_scales_tail, cal.DOF_GRID = original, old_grid
    total = max(1, sum(n for n, _ in seen))
    pooled = {float(d): sum(n * v[float(d)] for n, v in seen) / total for d in cal.DOF_CANDIDATES}
    dof = min(sorted(pooled, reverse=True), key=pooled.get)  # the first of equals from inf down: the lighter tail
    cal.DOF_GRID = (dof,)
    try:
        preds = rr.run_ours(rows, cells, **kw)
    finally:
        cal.DOF_GRID = old_grid
    return {**preds, "dof_pooled": dof, "dof_objective": pooled}


def apply_variant(name: str) -> dict:
    import importlib

    old = {}
    for mod, consts in VARIANTS[name].items():
        m = importlib.import_module(f"cellsynth.radio.{mod}")
        for k, v in consts.items():
            old[(mod, k)] = getattr(m, k)
            setattr(m, k, v)
    return old


def restore(old: dict) -> None:
    import importlib

    for (mod, k), v in old.items():
        setattr(importlib.import_module(f"cellsynth.radio.{mod}"), k, v)


def inner_rows(df, split: str, *, seed: int, max_cells: int, cap: int, offset: int = INNER_SEED_OFFSET,
               test_fraction: float = rr.TEST_FRACTION):
    """(rows, cells) of the inner split: outer held-out rows dropped first, then the same split
    again with seed + offset (holding out `test_fraction` of the outer training rows / blocks)."""
    train = df[~rr.split_mask(df, split, seed=seed)].reset_index(drop=True)  # outer test rows never go further
    test = rr.split_mask(train, split, seed=seed + offset, test_fraction=test_fraction)
    cells = rr.eligible_cells(train, test, max_cells)
    return rr._cell_rows(train, test, cells, cap, seed + offset), cells


def interval_score(sc: dict) -> float:
    """CE + |cov50 - 0.5| + |cov90 - 0.9| (the calibration's own objective, a priori)."""
    return sc["ce"] + abs(sc["cov50"] - 0.5) + abs(sc["cov90"] - 0.9)


def average_seeds(per_seed: list[dict]) -> dict:
    """One run's record from runs at several inner seeds: the mean of every number, the
    per-seed numbers under "per_seed" (lists in seed order)."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: float(np.mean([p[k] for p in per_seed])) for k in keys}
    out["per_seed"] = {k: [p[k] for p in per_seed] for k in keys}
    out["per_seed"]["interval_score"] = [interval_score(p) for p in per_seed]
    if any("dof_chosen" in p for p in per_seed):  # the dofs the fit chose at each seed (lists, not averaged)
        out["per_seed"]["dof_chosen"] = [p.get("dof_chosen", []) for p in per_seed]
    return out


def summarise(runs: dict) -> dict:
    """Per variant, over the dataset/split pairs every compared variant has: mean pooled MAE,
    mean median-cell MAE and mean interval score CE + |cov50 - 0.5| + |cov90 - 0.9| (the
    calibration's own objective, a priori), so variants are compared on the same pairs. A variant
    run at K inner seeds is named "<variant>~s<K>" (its figures: means over the seeds; with
    "interval_score_by_seed" / "mae_db_by_seed": the mean over pairs at each seed, so a difference
    between two variants can be read against its seed-to-seed spread)."""
    by_variant: dict[str, dict[str, dict]] = {}
    for key, sc in runs.items():
        ds, split, variant = key.split("/")
        by_variant.setdefault(variant, {})[f"{ds}/{split}"] = sc
    out = {}
    for variant, pairs in by_variant.items():
        out[variant] = {"pairs": sorted(pairs), "mae_db_mean": float(np.mean([p["mae_db"] for p in pairs.values()])),
                        "median_cell_mae_db_mean": float(np.mean([p["median_cell_mae_db"] for p in pairs.values()])),
                        # several seeds: the mean of the per-seed scores (not the score of the mean coverages)
                        "interval_score_mean": float(np.mean([np.mean(p["per_seed"]["interval_score"]) if "per_seed" in p
                                                              else interval_score(p) for p in pairs.values()]))}
        if all("per_seed" in p for p in pairs.values()):
            out[variant]["interval_score_by_seed"] = np.mean([p["per_seed"]["interval_score"] for p in pairs.values()], 0).tolist()
            out[variant]["mae_db_by_seed"] = np.mean([p["per_seed"]["mae_db"] for p in pairs.values()], 0).tolist()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="")
    ap.add_argument("--splits", default="random,blocks")
    ap.add_argument("--variants", default="flat,support")
    ap.add_argument("--max-cells", type=int, default=40)
    ap.add_argument("--seed", type=int, default=42, help="the OUTER split's seed (radio_real.py's default)")
    ap.add_argument("--cells-per-shard", type=int, default=80)
    ap.add_argument("--inner-seeds", type=int, default=1,
                    help="K > 1: each variant at K inner splits (seed offsets INNER_SEED_OFFSET x 1..K), figures averaged, "
                         "recorded as '<variant>~s<K>'")
    ap.add_argument("--inner-seed-start", type=int, default=1,
                    help="first inner split index k (seed offset INNER_SEED_OFFSET x k): fresh splits for a fresh rule "
                         "once seeds 1..K have been looked at (key suffix @from<k>)")
    ap.add_argument("--inner-test-fraction", type=float, default=rr.TEST_FRACTION,
                    help="share of the outer training rows (blocks) the inner split holds out; other than the outer "
                         "TEST_FRACTION: recorded as '<variant>...@tf<fraction>' (a smaller share: inner training rows "
                         "closer to the outer training density)")
    ap.add_argument("--max-train-rows", type=int, default=0,
                    help="cut the inner training rows per cell to N (inner test rows unchanged; radio_real.py's thin-data "
                         "reading, inside the outer training rows): recorded as '<variant>...@capN'; 0: the radio stage's cap")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--merge", default="", help="comma-separated result files of earlier runs (e.g. run in parallel) merged into --out")
    args = ap.parse_args(argv)
    if args.merge:
        out_path = Path(args.out)
        result = rr.read_result(out_path)
        for path in args.merge.split(","):
            other = json.loads(Path(path).read_text())
            result.setdefault("procedure", other.get("procedure"))
            result.setdefault("runs", {}).update(other.get("runs", {}))
        result["summary"] = summarise(result["runs"])
        rr.write_result(out_path, result)
        return result
    spec, df, cap = rr.bench_rows(args.dataset)
    thin = 0 < args.max_train_rows < cap
    cap = args.max_train_rows if thin else cap
    out_path = Path(args.out)
    result = rr.read_result(out_path)
    result.setdefault("procedure", __doc__.split("\n\n")[1].replace("\n", " "))
    result.setdefault("runs", {})
    if args.inner_seed_start < 1:
        raise SystemExit("ConfigError: --inner-seed-start: must be >= 1 (0 is the outer split)")
    offsets = [INNER_SEED_OFFSET * (args.inner_seed_start + k) for k in range(max(1, args.inner_seeds))]
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        inner = {off: inner_rows(df, split, seed=args.seed, max_cells=args.max_cells, cap=cap, offset=off,
                                 test_fraction=args.inner_test_fraction) for off in offsets}
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            per_seed = []
            for off, (rows, cells) in inner.items():
                old = apply_variant(variant)
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    fit = run_pooled_dof if variant in POOLED_DOF else rr.run_ours
                    preds = fit(rows, cells, seed=args.seed + off, cells_per_shard=args.cells_per_shard, n_samples=0,
                                weighted=variant not in UNWEIGHTED)
                    sc = rr.score(rows, preds, epistemic=True)
                finally:
                    restore(old)
                sc["epistemic_ratio_3km_train"] = sc["epistemic_3km_db"] / sc["epistemic_train_db"]
                sc["dof_chosen"] = [d if np.isfinite(d) else "inf" for d in sorted({float(d[0]) for d in preds.get("dof", []) if len(d)})]
                sc.update({"n_cells": len(cells), "n_train": int(sum(len(r["y_tr"]) for r in rows)),
                           "n_test": int(sum(len(r["y_te"]) for r in rows)), "wall_s": time.perf_counter() - t0,
                           # process CPU of the fit, prediction and scoring (single-threaded: OMP_NUM_THREADS 1)
                           "cpu_s": time.process_time() - c0})
                per_seed.append(sc)
                print(f"{spec.name}/{split}/{variant} inner seed {args.seed + off}",
                      json.dumps({k: round(v, 3) for k, v in sc.items() if isinstance(v, float)}), flush=True)
            sc = per_seed[0] if len(per_seed) == 1 else average_seeds(per_seed)
            sc.update({"variant": VARIANTS[variant], "outer_seed": args.seed, "inner_seeds": [args.seed + o for o in offsets],
                       "max_cells": args.max_cells, **{k: v for k, v in rr._commit().items() if k != "commit"}})
            if len(per_seed) == 1:
                sc["inner_seed"] = args.seed + offsets[0]
            key = f"{spec.name}/{split}/{variant}" + (f"~s{len(per_seed)}" if len(per_seed) > 1 else "")
            if args.inner_seed_start != 1:
                key += f"@from{args.inner_seed_start}"
            if args.inner_test_fraction != rr.TEST_FRACTION:
                sc["inner_test_fraction"] = args.inner_test_fraction
                key += f"@tf{args.inner_test_fraction:g}"
            if thin:
                sc["max_train_rows"] = cap
                key += f"@cap{cap}"
            rr.record_run(result, key, sc, out_path)
    return result


if __name__ == "__main__":
    main()
