"""The annotation file is streamed: the values ``json.loads`` gives, errors placed in the whole
file, defects reported in a fixed order whatever the file's order, and memory that holds
columns, not a Python object per record."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from jigsawdata.coco import jsonstream
from jigsawdata.coco.jsonstream import ArrayStream, InvalidJson, ObjectStream, open_document
from jigsawdata.coco.reader import load_coco
from jigsawdata.errors import InputError

DOC = {
    "info": {"description": 'é ü \u2603 "quoted" \\ back', "year": 2017},
    "images": [
        {"id": 1, "file_name": "a/b é.jpg", "width": 640.0, "height": 480},
        {"id": 2**70, "coco_url": "http://x/train2017/2.jpg"},
    ],
    "annotations": [
        {"id": 1, "bbox": [float("nan"), float("inf"), -float("inf"), 1e-320]},
        {"id": 2, "bbox": [0.1, 0.2, 1.5e300, -0.0], "segmentation": [[1.25] * 9]},
    ],
    "numbers": [1e300, 1e-320, 123456789012, -7, 0.5, 2.5e-08, True, None, "s", [], {}],
    "empty": [],
    "categories": [{"id": 1, "name": "thing"}],
}


def _read(data: bytes | io.BytesIO):
    doc = open_document(data if isinstance(data, io.BytesIO) else io.BytesIO(data))
    if isinstance(doc, ObjectStream):
        return {key: list(value) if isinstance(value, ArrayStream) else value for key, value in doc}
    return doc


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32-be"])
def test_streamed_values_are_those_of_json_loads(monkeypatch, block, encoding):
    """Tiny read blocks cut every number, string and literal somewhere (``1e+300`` as ``1e``)."""
    monkeypatch.setattr(jsonstream, "_BLOCK", block)
    for indent in (None, 1):
        data = json.dumps(DOC, indent=indent, ensure_ascii=encoding == "utf-8").encode(encoding)
        assert repr(_read(data)) == repr(json.loads(data))  # repr: NaN != NaN, and -0.0 == 0.0


def test_a_top_level_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text(' [{"images": []}, 2.5] ')
    with pytest.raises(InputError, match="the top level is a list, not an object"):
        load_coco(ann, tmp_path / "train")


@pytest.mark.parametrize(
    "text",
    [
        '{"images": [{"id": 1},\n {"id": 2,\n "x": }]}',
        '{"a": [1, 2',
        '{"a": 1} {"b": 2}',
        "",
        "  \n ",
        '{"a" 1}',
        '{"a": 1 "b": 2}',
        "{1: 2}",
        '{"a": [1 2]}',
        '{"a": [1e]}',
        '{"a": tru}',
        '{"a": "\\x"}',
        '{"a": 1,\n\n "b": [3,\n 4,\n}',
        "[1, 2] 3",
        '{"a": [1.]}',
        '{"a": "\\u12zz"}',
        '{"a": -Inf}',
        '{"a": [{"id": 1,, "b": 2}]}',
    ],
)
def test_invalid_json_is_placed_in_the_whole_file_as_json_places_it(monkeypatch, text):
    monkeypatch.setattr(jsonstream, "_BLOCK", 3)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(InvalidJson) as raised:
        _read(text.encode())
    assert str(raised.value) == str(expected.value)


@pytest.mark.parametrize("block", [5, 1 << 20])
@pytest.mark.slow
def test_an_error_early_in_a_large_file_is_raised_without_reading_the_rest(monkeypatch, block):
    """Retrying with more text is for values the window's end cut; an error in the middle
    of the text read is final, so memory stays at a block or two, not the file."""
    monkeypatch.setattr(jsonstream, "_BLOCK", block)
    good = ", ".join(json.dumps({"id": i, "bbox": [1, 2, 3, 4], "name": "x" * 40}) for i in range(2, 200_000))
    data = ('{"annotations": [{"id": 1,, "bbox": [1, 2, 3, 4]}, ' + good + "]}").encode()
    assert len(data) > 16 * (1 << 20)
    fh = io.BytesIO(data)
    with pytest.raises(InvalidJson, match=r"Expecting property name enclosed in double quotes: line 1 column 27"):
        _read(fh)
    assert fh.tell() <= 1 << 20  # one block at most, of a file of over 16 MiB


@pytest.mark.parametrize("block", [3, 7, 1 << 20])
@pytest.mark.parametrize(
    "data",
    [
        b'{"a": [' + b"1, " * 400_000 + b'"x\xff"]}',
        b'\xef\xbb\xbf{"a": [' + b"1, " * 100 + b'"\xe2\x82"]}',
        b'{"a": "ok\xe2\x82',
        b'{"a": [' + b"9" * 9000 + b"]}",
    ],
    ids=["utf-8 far in", "utf-8-sig", "cut sequence at the end", "integer of 9000 digits"],
)
@pytest.mark.slow
def test_undecodable_input_is_placed_in_the_whole_file_as_json_places_it(monkeypatch, block, data):
    monkeypatch.setattr(jsonstream, "_BLOCK", block)
    with pytest.raises(ValueError) as expected:
        json.loads(data)
    with pytest.raises(InvalidJson) as raised:
        _read(data)
    assert str(raised.value).startswith(str(expected.value))  # the integer's message also gets its place


def test_a_file_cut_short_is_one_line_error(tmp_path):
    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    text = json.dumps(
        {
            "images": [{"id": i, "file_name": f"{i}.jpg", "width": 9, "height": 9} for i in range(1, 500)],
            "annotations": [],
            "categories": [{"id": 1, "name": "a"}],
        }
    )
    ann = root / "ann.json"
    ann.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"ann\.json is not valid JSON: .*line 1 column \d+"):
        load_coco(ann, root / "train")


# ---------------------------------------------------------------- the order of defects


def _set(images=None, annotations=None, order=("images", "annotations", "categories")) -> dict:
    images = images or [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(1, 7)]
    annotations = annotations or [
        {"id": i, "image_id": 1 + i % 6, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(1, 9)
    ]
    parts = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    return {key: parts[key] for key in order}


def _load(tmp_path: Path, data: dict):
    (tmp_path / "train").mkdir(exist_ok=True)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return load_coco(ann, tmp_path / "train")


def test_image_defects_come_before_annotation_defects_whatever_the_file_order(tmp_path):
    data = _set(order=("annotations", "categories", "images"))
    data["annotations"][0]["iscrowd"] = 5
    data["images"][4]["height"] = -1
    with pytest.raises(InputError, match=r"images\[4\] \(id 5\): 'height' must be >= 1, got -1"):
        _load(tmp_path, data)
    data["images"][4]["height"] = 10
    with pytest.raises(InputError, match=r"annotations\[0\] \(id 1\): 'iscrowd' must be 0 or 1"):
        _load(tmp_path, data)


@pytest.mark.parametrize("bad_at,reported", [(2, "width"), (4, "twice"), (5, "twice")])
def test_a_duplicate_id_is_reported_where_the_record_is_read(tmp_path, bad_at, reported):
    """images[4] repeats images[1]'s id (found by sorting, after reading): a bad field in an
    earlier record is still reported first, one in the same or a later record is not."""
    data = _set()
    data["images"][4]["id"] = 2.0
    data["images"][bad_at]["width"] = "wide"
    expected = {
        "width": rf"images\[{bad_at}\] \(id \d\): 'width' must be an integer",
        "twice": r"images\[4\] \(id 2\.0\): image id 2 is used twice \(images\[1\] too\)",
    }[reported]
    with pytest.raises(InputError, match=expected):
        _load(tmp_path, data)


def test_a_list_given_twice_counts_the_last_time_as_with_json(tmp_path):
    first = json.dumps(_set(images=[{"id": 1, "width": "bad"}]))
    second = json.dumps(_set())[1:]
    (tmp_path / "train").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text(first[:-1] + ", " + second)
    assert len(json.loads(ann.read_text())["images"]) == len(load_coco(ann, tmp_path / "train").images) == 6


def test_ids_beyond_64_bits_are_refused_by_name(tmp_path):
    data = _set()
    data["annotations"][2]["image_id"] = 2**64
    with pytest.raises(InputError, match=r"annotations\[2\] \(id 3\): 'image_id' must fit in 64 bits"):
        _load(tmp_path, data)


# ---------------------------------------------------------------- memory


def _coco_like(path: Path, images: int, per_image: int = 8) -> int:
    """A COCO-shaped file with polygons: as many Python objects per annotation as COCO has."""
    polygon = [[round(10 + 3.7 * k, 2) for k in range(24)]]
    anns = [
        {
            "id": i * per_image + k + 1,
            "image_id": i + 1,
            "category_id": 1 + k % 5,
            "iscrowd": 0,
            "bbox": [10.5 + k, 20.25, 30.0, 40.0],
            "area": 1200.0,
            "segmentation": polygon,
        }
        for i in range(images)
        for k in range(per_image)
    ]
    path.write_text(
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "images": [
                    {
                        "id": i + 1,
                        "file_name": f"{i + 1:012d}.jpg",
                        "width": 640,
                        "height": 480,
                        "license": 1,
                        "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
                    }
                    for i in range(images)
                ],
                "annotations": anns,
                "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 6)],
            }
        )
    )
    return len(anns)


def _peak_bytes(ann: Path, images_dir: Path) -> int:
    tracemalloc.start()
    try:
        source = load_coco(ann, images_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(source.images[-1].boxes) == 8
    return peak


@pytest.mark.slow
def test_reading_holds_columns_not_a_python_object_per_record(tmp_path):
    """The peak grows by well under 200 bytes per annotation (``json.loads`` and one object
    per record took ~1.8 KB per crop); the fixed part is the read block."""
    (tmp_path / "train").mkdir()
    small, large = tmp_path / "small.json", tmp_path / "large.json"
    n_small, n_large = _coco_like(small, 500), _coco_like(large, 5000)
    marginal = (_peak_bytes(large, tmp_path / "train") - _peak_bytes(small, tmp_path / "train")) / (n_large - n_small)
    assert marginal < 200, f"{marginal:.0f} bytes per annotation"


# ---------------------------------------------------------------- columns


def test_a_column_holds_what_concatenate_would():
    """Chunks of every size, empty ones and keys that grow wider on the way (padded as numpy
    pads them); the mapping grows many times over."""
    from jigsawdata.columns import Column

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 2**40, size=(int(n), 4)) for n in rng.integers(0, 3000, size=40)]
    keys = [
        np.array([b"k" * int(w)] * int(n), dtype=bytes)
        for n, w in zip(rng.integers(0, 50, 40), rng.integers(1, 30, 40))
    ]
    boxes, names = Column(), Column()
    for chunk, key in zip(chunks, keys):
        boxes.add(chunk)
        names.add(key)
    assert np.array_equal(boxes.array(), np.concatenate(chunks))
    assert boxes.array().shape[1:] == (4,)
    assert names.array().dtype == np.concatenate(keys).dtype
    assert np.array_equal(names.array(), np.concatenate(keys))
    assert Column().array().shape == (0,)
