"""The paper's published numbers (Tables 3-7, in %), so reports can print them beside ours.

Keys: ``(paper dataset, pair)`` -> ``{column: value}``. Columns are ``teacher_acc``,
``teacher_asr`` and ``"<method>/<attack>/<metric>"`` (e.g. ``"fkd/ckd/asr"``). Figures 2 and
4-7 are plots without printed values, so there is nothing to copy for them.
"""

from __future__ import annotations

_C, _G, _F, _I = "cifar100", "gtsrb", "flower17", "imagenet"
_W16, _R56 = "wrn28_4-wrn16_2", "wrn28_4-resnet56"
_PW, _PP = "pyramidnet200-wrn28_4", "pyramidnet200-pyramidnet110"


def _rows(columns: tuple[str, ...], rows: dict[tuple[str, str], tuple[float, ...]]
          ) -> dict[tuple[str, str], dict[str, float]]:
    return {key: dict(zip(columns, values, strict=True)) for key, values in rows.items()}


# Table 3: teacher ACC; FKD student ACC / ASR per attack
TABLE3 = _rows(
    ("teacher_acc", "fkd/ckd/acc", "fkd/ckd/asr", "fkd/lba/acc", "fkd/lba/asr",
     "fkd/htba/acc", "fkd/htba/asr"),
    {
        (_C, _W16): (80.72, 79.43, 96.14, 80.15, 74.52, 78.52, 22.36),
        (_C, _R56): (80.72, 76.65, 95.36, 79.24, 74.36, 75.86, 20.57),
        (_C, _PW): (83.45, 81.49, 96.34, 81.24, 75.29, 80.62, 21.54),
        (_C, _PP): (83.45, 80.62, 93.52, 80.63, 76.81, 80.51, 23.87),
        (_G, _W16): (98.57, 97.23, 93.08, 97.05, 75.21, 96.57, 20.55),
        (_G, _R56): (98.57, 97.56, 93.54, 98.13, 75.67, 96.48, 23.62),
        (_G, _PW): (99.27, 97.86, 95.13, 98.14, 71.52, 97.96, 19.25),
        (_G, _PP): (99.27, 98.21, 96.31, 98.40, 77.85, 95.69, 21.36),
        (_F, _PW): (96.25, 91.34, 76.24, 90.98, 71.34, 92.57, 16.57),
        (_F, _PP): (96.25, 95.12, 82.45, 92.54, 80.26, 93.04, 15.89),
        (_I, _PW): (84.36, 82.41, 54.87, 81.14, 49.63, 82.75, 6.27),
        (_I, _PP): (84.36, 83.25, 55.42, 82.51, 50.31, 81.95, 7.34),
    },
)

# Table 4: teacher ASR; student ASR for FKD and RobustKD under CKD and LBA
TABLE4 = _rows(
    ("teacher_asr", "fkd/ckd/asr", "fkd/lba/asr", "robustkd/ckd/asr", "robustkd/lba/asr"),
    {
        (_C, _W16): (96.14, 90.17, 80.46, 4.32, 2.67),
        (_C, _R56): (96.14, 93.58, 72.84, 3.31, 0.72),
        (_C, _PW): (95.52, 95.68, 76.42, 10.54, 5.69),
        (_C, _PP): (95.52, 92.38, 77.83, 8.46, 7.15),
        (_G, _W16): (85.32, 92.63, 74.12, 6.45, 8.14),
        (_G, _R56): (85.32, 93.54, 75.49, 4.01, 3.87),
        (_G, _PW): (85.64, 94.87, 70.58, 6.73, 5.69),
        (_G, _PP): (85.64, 95.52, 78.46, 8.32, 2.51),
        (_F, _PW): (98.67, 75.81, 70.42, 6.42, 4.13),
        (_F, _PP): (98.67, 82.36, 80.17, 8.12, 2.56),
        (_I, _PW): (84.76, 53.34, 49.04, 6.93, 7.24),
        (_I, _PP): (84.76, 55.36, 50.14, 8.41, 5.64),
    },
)

# Table 5: teacher ACC; student ACC for FKD and RobustKD under CKD and LBA
TABLE5 = _rows(
    ("teacher_acc", "fkd/ckd/acc", "fkd/lba/acc", "robustkd/ckd/acc", "robustkd/lba/acc"),
    {
        (_C, _W16): (80.72, 78.23, 78.62, 74.57, 76.25),
        (_C, _R56): (80.72, 78.31, 79.64, 74.26, 75.96),
        (_C, _PW): (83.45, 83.47, 84.51, 81.42, 81.02),
        (_C, _PP): (83.45, 83.42, 82.46, 81.63, 80.45),
        (_G, _W16): (98.57, 100.00, 99.56, 98.74, 97.51),
        (_G, _R56): (98.57, 100.00, 100.00, 97.82, 98.06),
        (_G, _PW): (99.27, 100.00, 98.54, 97.51, 97.80),
        (_G, _PP): (99.27, 100.00, 100.00, 98.04, 98.42),
        (_F, _PW): (96.25, 90.45, 90.91, 86.74, 87.43),
        (_F, _PP): (96.25, 95.47, 93.45, 89.42, 90.15),
        (_I, _PW): (84.36, 84.26, 83.47, 81.64, 82.59),
        (_I, _PP): (84.36, 84.15, 83.16, 82.15, 82.24),
    },
)

# Table 6: similar architectures on CIFAR-100 (teacher ACC / ASR; student ACC / ASR)
TABLE6 = _rows(
    ("teacher_acc", "teacher_asr", "fkd/ckd/acc", "fkd/ckd/asr", "fkd/lba/acc", "fkd/lba/asr",
     "robustkd/ckd/acc", "robustkd/ckd/asr", "robustkd/lba/acc", "robustkd/lba/asr"),
    {
        (_C, "wrn28_4-wrn16_4"): (78.82, 92.04, 79.44, 96.13, 80.17, 74.58, 78.36, 13.32,
                                  78.95, 1.61),
        (_C, "wrn28_4-wrn28_2"): (78.68, 99.83, 78.28, 94.05, 77.64, 80.13, 76.02, 10.94,
                                  76.17, 3.56),
    },
)

# Table 7: adaptive CKD (CKD + low variance) against RobustKD on CIFAR-100
TABLE7 = _rows(
    ("teacher_acc", "teacher_asr", "robustkd/adaptive-ckd/acc", "robustkd/adaptive-ckd/asr"),
    {
        (_C, "wrn28_4-wrn16_4"): (75.47, 90.56, 77.12, 16.14),
        (_C, "wrn28_4-wrn28_2"): (75.47, 90.56, 76.85, 19.43),
        (_C, _W16): (75.47, 90.56, 75.98, 14.42),
        (_C, _R56): (75.47, 90.56, 77.17, 12.86),
    },
)

PAPER_TABLES: dict[str, dict[tuple[str, str], dict[str, float]]] = {
    "table3": TABLE3, "table4": TABLE4, "table5": TABLE5, "table6": TABLE6, "table7": TABLE7,
}


def paper_value(study: str, dataset: str, pair: str, column: str) -> float | None:
    """The paper's number for one cell, or ``None`` where the paper has none."""
    return PAPER_TABLES.get(study, {}).get((dataset, pair), {}).get(column)
