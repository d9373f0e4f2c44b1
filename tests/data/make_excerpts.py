"""Re-create the label excerpts in this folder from the torchxrayvision wheel (see README.md).

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv
    cd /tmp/txv && unzip -o torchxrayvision-1.5.7-py3-none-any.whl 'torchxrayvision/data/*'
    python tests/data/make_excerpts.py /tmp/txv/torchxrayvision/data tests/data

Rows are copied verbatim (whole files' header and the chosen rows, all rows of each chosen id).
"""
import csv
import gzip
import io
import random
import sys
import zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(4)


def lines_gz(name):
    with gzip.open(src / name, "rt", newline="") as f:
        return f.read().splitlines(keepends=True)


def by_id(lines, key_col):
    groups = {}
    for line in lines[1:]:
        key = next(csv.reader([line]))[key_col]
        groups.setdefault(key, []).append(line)
    return groups


def write(name, header, rows):
    with gzip.open(dst / name, "wt", newline="") as f:
        f.write(header)
        f.writelines(rows)


# NIH: 240 rows at random plus, for each of the 14 findings, 4 rows that hold it.
nih = lines_gz("Data_Entry_2017_v2020.csv.gz")
rows = nih[1:]
chosen = set(rng.sample(range(len(rows)), 240))
for finding in ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]:
    hits = [i for i, r in enumerate(rows) if finding in r.split(",")[1].split("|")]
    chosen.update(rng.sample(hits, 4))
write("nih_Data_Entry_2017_v2020.csv.gz", nih[0], [rows[i] for i in sorted(chosen)])

# VinBig: every row of 40 images with findings and 30 without.
vin = lines_gz("vinbigdata-train.csv.gz")
groups = by_id(vin, 0)
abnormal = [k for k, g in groups.items() if any(",No finding," not in r for r in g)]
normal = [k for k, g in groups.items() if all(",No finding," in r for r in g)]
keys = rng.sample(abnormal, 40) + rng.sample(normal, 30)
write("vinbig_train.csv.gz", vin[0], [r for k in keys for r in groups[k]])

# RSNA: every row of 60 positive and 60 negative patients.
with zipfile.ZipFile(src / "kaggle_stage_2_train_labels.csv.zip") as z:
    rsna = io.TextIOWrapper(z.open("stage_2_train_labels.csv"), newline="").read().splitlines(keepends=True)
groups = by_id(rsna, 0)
pos = [k for k, g in groups.items() if g[0].rstrip().endswith(",1")]
neg = [k for k, g in groups.items() if g[0].rstrip().endswith(",0")]
keys = rng.sample(pos, 60) + rng.sample(neg, 60)
write("rsna_stage_2_train_labels.csv.gz", rsna[0], [r for k in keys for r in groups[k]])

# SIIM: 40 empty images, 30 with one mask row, and 10 with several rows (unioned).
siim = lines_gz("siim-pneumothorax-train-rle.csv.gz")
groups = by_id(siim, 0)
empty = [k for k, g in groups.items() if len(g) == 1 and g[0].rstrip().split(",")[1].strip() == "-1"]
single = [k for k, g in groups.items() if len(g) == 1 and not g[0].rstrip().split(",")[1].strip() == "-1"]
multi = [k for k, g in groups.items() if len(g) > 1]
keys = rng.sample(empty, 40) + rng.sample(single, 30) + rng.sample(multi, 10)
write("siim_train-rle.csv.gz", siim[0], [r for k in keys for r in groups[k]])
