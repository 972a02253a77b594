"""Readers for MovieLens (GroupLens 100K, 1M, latest) and generic CSV/TSV/Parquet files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from common.data import formats
from common.data.errors import DataError
from common.data.readers import load_interactions

TOY_FLAGS = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation, Children's, Comedy
DRAMA_FLAGS = "0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0"
NO_FLAGS = "|".join(["0"] * 19)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def rows(data) -> list[tuple[str, str, float, float]]:
    """(user id, item id, rating, timestamp) per interaction, in order."""
    return [(data.user_ids[u], data.item_ids[i], float(r), float(t))
            for u, i, r, t in zip(data.user, data.item, data.rating, data.timestamp)]


def info(data, item_id: str):
    return data.items[data.item_ids.index(item_id)]


@pytest.fixture(params=["arrow", "rows"])
def path_kind(request, monkeypatch) -> str:
    """Run a test with pyarrow's column-wise path (when installed) and with the row-by-row path only."""
    if request.param == "rows":
        monkeypatch.setattr(formats, "_arrow_csv", lambda *a, **k: None)
        monkeypatch.setattr(formats, "_arrow_columns", lambda *a, **k: None)
    elif not _has_pyarrow():
        pytest.skip("pyarrow not installed")
    return request.param


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def grouplens_dir(root: Path) -> Path:
    d = root / "ml-100k"
    write(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t1\t5\t881251000\n")
    write(d / "u.item",
          f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{TOY_FLAGS}\n"
          f"242|Kolya|24-Jan-1997||http://x|{DRAMA_FLAGS}\n"
          f"267|unknown||||{'|'.join(['1'] + ['0'] * 18)}\n"
          f"302|Café (1997)|01-Jan-1997||http://y|{NO_FLAGS}\n", encoding="latin-1")
    return d


def ml1m_dir(root: Path) -> Path:
    d = root / "ml-1m"
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(d / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                            "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                            "5::Amélie (2001)::Comedy|Romance\n", encoding="latin-1")
    return d


def ml_latest_dir(root: Path) -> Path:
    d = root / "ml-latest-small"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
                             "6,1,0.5,845553522\n")
    write(d / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy\n'
                            '3,"American President, The (1995)",Comedy|Drama|Romance\n'
                            "9,Black Mirror,(no genres listed)\n")
    return d


def generic_csv(root: Path) -> Path:
    return write(root / "reviews.csv", 'user,item,rating,timestamp,text\nu1,i1,5,10,"Great, loved it"\n'
                                       'u2,i1,2,11,"Meh.\nToo long."\nu1,i2,3,12,\n')


# ---------------------------------------------------------------- round trips


def test_grouplens_100k_round_trip(tmp_path):
    data = formats.read_grouplens_100k(grouplens_dir(tmp_path))
    assert rows(data) == [("196", "242", 3.0, 881250949.0), ("186", "302", 3.0, 891717742.0),
                          ("196", "1", 5.0, 881251000.0)]
    assert data.user_ids == ("186", "196") and data.explicit
    assert data.item_ids == ("1", "242", "267", "302")  # 267 has metadata but no rating: kept
    assert info(data, "1").text == "Toy Story (1995) Genres: Animation, Children's, Comedy."
    assert info(data, "242").text == "Kolya (1997) Genres: Drama."  # year from the release date
    assert info(data, "267").text == "unknown Genres: unknown."  # no year anywhere
    assert info(data, "302").text == "Café (1997)"  # latin-1
    assert data.report == ()


def test_grouplens_100k_without_item_file_reports_it(tmp_path):
    d = grouplens_dir(tmp_path)
    (d / "u.item").unlink()
    data = formats.read_grouplens_100k(d)
    assert info(data, "242").text == "242"
    assert data.report == ("no u.item: items are titled by their id",)


def test_ml_1m_round_trip(tmp_path):
    data = formats.read_ml_1m(ml1m_dir(tmp_path))
    assert rows(data) == [("1", "1193", 5.0, 978300760.0), ("1", "661", 3.0, 978302109.0),
                          ("2", "1193", 4.0, 978298413.0)]
    assert info(data, "661").text == "James and the Giant Peach (1996) Genres: Animation, Children's, Musical."
    assert info(data, "5").title == "Amélie" and info(data, "5").year == "2001"
    assert data.n_items == 3 and data.n_users == 2


def test_ml_latest_round_trip(tmp_path, path_kind):
    data = formats.read_ml_latest(ml_latest_dir(tmp_path))
    assert rows(data) == [("1", "1", 4.0, 964982703.0), ("1", "3", 4.5, 964981247.0),
                          ("6", "1", 0.5, 845553522.0)]
    assert info(data, "1").text == "Toy Story (1995) Genres: Adventure, Animation, Children, Comedy."
    assert info(data, "3").title == "American President, The"
    assert info(data, "9").text == "Black Mirror"  # no year, "(no genres listed)" means none
    assert data.rating.dtype == np.float32 and data.timestamp.dtype == np.float64


def test_ml_latest_reports_items_missing_from_movies_csv(tmp_path, path_kind):
    d = ml_latest_dir(tmp_path)
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,1\n1,77,3,2\n")
    data = formats.read_ml_latest(d)
    assert info(data, "77").title == "77"
    assert data.report == ("1 items have no entry in movies.csv: titled by their id",)


def test_generic_csv_round_trip_with_texts(tmp_path, path_kind):
    items = write(tmp_path / "items.csv", "item,title,text\ni1,Toy Story (1995),A toy comes alive.\n"
                                          "i2,Heat,\ni3,Cold start only,Never rated.\n")
    data, texts = formats.read_generic_with_text(generic_csv(tmp_path), items)
    assert rows(data) == [("u1", "i1", 5.0, 10.0), ("u2", "i1", 2.0, 11.0), ("u1", "i2", 3.0, 12.0)]
    assert texts == ["Great, loved it", "Meh.\nToo long.", ""]
    assert data.name == "reviews" and data.item_ids == ("i1", "i2", "i3")
    assert info(data, "i1").text == "Toy Story (1995) A toy comes alive."
    assert info(data, "i2").text == "Heat" and info(data, "i3").description == "Never rated."
    assert rows(formats.read_generic(generic_csv(tmp_path), items)) == rows(data)


def test_generic_tsv_implicit_without_item_file(tmp_path, path_kind):
    path = write(tmp_path / "clicks.tsv", "user\titem\tsession\na\tx\t1\nb\tx\t2\na\ty\t3\n")
    data, texts = formats.read_generic_with_text(path, None)
    assert texts is None and not data.explicit
    assert [(data.user_ids[u], data.item_ids[i]) for u, i in zip(data.user, data.item)] == \
        [("a", "x"), ("b", "x"), ("a", "y")]
    assert list(data.rating) == [1.0, 1.0, 1.0] and list(data.timestamp) == [0.0, 1.0, 2.0]
    assert data.report == ("ignored columns: session",)


def test_generic_csv_strips_bom_and_reads_latin1_only_when_asked(tmp_path, path_kind, caplog):
    path = write(tmp_path / "d.csv", "\ufeffuser,item,text\n1,2,café\n")
    assert formats.read_generic_with_text(path)[1] == ["café"]
    path = write(tmp_path / "e.csv", "user,item,text\n1,2,cafe\n3,4,café\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"e.csv:3: expected utf-8 text, found byte 0xe9.*--encoding latin-1"):
        formats.read_generic_with_text(path)  # no silent fallback: the line of the first bad byte
    assert "not UTF-8" not in caplog.text
    assert formats.read_generic_with_text(path, encoding="latin-1")[1] == ["cafe", "café"]
    assert "e.csv: reading as iso8859-1, not UTF-8, as asked" in caplog.text


def test_duplicates_are_dropped_counted_and_texts_stay_aligned(tmp_path, path_kind):
    path = write(tmp_path / "d.csv", "user,item,rating,timestamp,text\n"
                                     "u1,i1,1,20,latest\nu1,i1,2,10,older\nu2,i1,3,5,other\nu1,i1,4,20,tie-last\n")
    data, texts = formats.read_generic_with_text(path)
    assert rows(data) == [("u2", "i1", 3.0, 5.0), ("u1", "i1", 4.0, 20.0)]
    assert texts == ["other", "tie-last"]
    assert data.report == ("dropped 2 duplicate (user, item) rows, kept the latest of each",)


def test_ml_formats_count_duplicates(tmp_path):
    d = tmp_path / "dup"
    write(d / "ratings.dat", "1::10::5::100\n1::10::3::200\n2::10::4::100\n")
    data = formats.read_ml_1m(d)
    assert rows(data) == [("1", "10", 3.0, 200.0), ("2", "10", 4.0, 100.0)]
    assert data.report[0].startswith("dropped 1 duplicate")


def test_parquet_round_trip(tmp_path, path_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"user": [1, 2, 1], "item": ["a", "a", "b"], "rating": [4.5, 3.0, 1.0],
                      "timestamp": pa.array([1_000_000, 2_000_000, 3_000_000], pa.timestamp("ms")),
                      "text": ["nice", None, "bad"]})
    pq.write_table(table, tmp_path / "data.parquet")
    pq.write_table(pa.table({"item": ["a", "b"], "title": ["Alpha (2001)", "Beta"], "text": ["x", "y"]}),
                   tmp_path / "items.parquet")
    data, texts = formats.read_generic_with_text(tmp_path / "data.parquet", tmp_path / "items.parquet")
    assert rows(data) == [("1", "a", 4.5, 1000.0), ("2", "a", 3.0, 2000.0), ("1", "b", 1.0, 3000.0)]
    assert texts == ["nice", "", "bad"]  # a null text is an empty one
    assert info(data, "a").text == "Alpha (2001) x"


def test_parquet_values_read_the_same_on_both_paths(tmp_path, path_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"user": [1.0, 2.0], "item": [7, 8], "rating": ["4", "5.5"],
                             "tags": [[1, 2], []], "text": [None, " hi "]}), path)
    data, texts = formats.read_generic_with_text(path)
    assert rows(data) == [("1", "7", 4.0, 0.0), ("2", "8", 5.5, 1.0)] and texts == ["", "hi"]
    assert data.report == ("ignored columns: tags",)
    pq.write_table(pa.table({"user": [1], "item": [7], "rating": [[1.0]]}), path)
    with pytest.raises(DataError, match=r"d.parquet: column 'rating': expected numbers or strings, found list"):
        formats.read_generic(path)


def test_an_id_equal_to_the_column_name_is_data_not_a_header(tmp_path, path_kind):
    data = formats.read_generic(write(tmp_path / "d.csv", "user,item\nuser,x\n1,item\n"))
    assert data.user_ids == ("1", "user") and data.item_ids == ("item", "x")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = write(tmp_path / "data.parquet", "not parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"data.parquet: reading Parquet needs pyarrow"):
        formats.read_generic(path, None)


def test_auto_detection_through_load_interactions(tmp_path):
    assert load_interactions(str(grouplens_dir(tmp_path))).item_ids == ("1", "242", "267", "302")
    assert load_interactions(str(ml1m_dir(tmp_path))).user_ids == ("1", "2")
    assert load_interactions(str(ml_latest_dir(tmp_path))).item_ids == ("1", "3", "9")
    items = write(tmp_path / "items.csv", "item,title\ni1,One\n")
    generic = load_interactions(str(generic_csv(tmp_path)), item_file=str(items))
    assert generic.name == "reviews" and info(generic, "i1").title == "One"
    assert generic.report == ("1 items have no entry in items.csv: titled by their id",)


# ---------------------------------------------------------------- validation

ML_HEADER = "userId,movieId,rating,timestamp\n"
CSV_ERRORS = [
    ("ratings.csv", "userId,movieId,score,timestamp\n1,1,4,1\n",
     r"ratings.csv:1: missing required column 'rating'.*found header userId, movieId, score, timestamp"),
    ("ratings.csv", ML_HEADER + "1,1,4,1\n" + ML_HEADER, r"ratings.csv:3: expected a data row, found the header .*duplicate"),
    ("ratings.csv", ML_HEADER + "1,1,4,1\n1,2,abc,2\n", r"ratings.csv:3: column 'rating': expected a number, found 'abc'"),
    ("ratings.csv", ML_HEADER + "1,1,nan,1\n", r"ratings.csv:2: column 'rating': expected a finite number, found 'nan'"),
    ("ratings.csv", ML_HEADER + "1,1,4,inf\n", r"ratings.csv:2: column 'timestamp': expected a finite number"),
    ("ratings.csv", ML_HEADER + "1,1,4,2020-01-01\n", r"ratings.csv:2: column 'timestamp': expected a number"),
    ("ratings.csv", ML_HEADER + "1,1,4,1\n\n1,2,3\n", r"ratings.csv:4: expected 4 fields separated by ',' .*found 3"),
    ("ratings.csv", ML_HEADER + "1,1,4,1,9\n", r"ratings.csv:2: expected 4 fields .*found 5"),
    ("ratings.csv", "", r"ratings.csv:1: expected a header line .*found an empty file"),
    ("ratings.csv", ML_HEADER, r"ratings.csv:2: expected data rows after the header, found none"),
    ("ratings.csv", ML_HEADER + " ,1,4,1\n", r"ratings.csv:2: column 'userId': expected a non-empty id"),
    ("ratings.csv", ML_HEADER + "1,,4,1\n", r"ratings.csv:2: column 'movieId': expected a non-empty id"),
    ("movies.csv", "movieId,name,genres\n1,X,Drama\n", r"movies.csv:1: missing required column 'title'"),
    ("movies.csv", "movieId,title,genres\n1,X,Drama\n2,Y,\n1,Z,Drama\n",
     r"movies.csv:4: expected each item id once, found '1' again \(first on line 2\)"),
]


@pytest.mark.parametrize("name,text,match", CSV_ERRORS)
def test_ml_latest_errors_name_file_line_and_expectation(tmp_path, path_kind, name, text, match):
    d = ml_latest_dir(tmp_path)
    write(d / name, text)
    with pytest.raises(DataError, match=match):
        formats.read_ml_latest(d)


GENERIC_ERRORS = [
    ("user,rating\n1,4\n", r"d.csv:1: missing required column 'item'.*found header user, rating"),
    ("user,item\n1,2\nuser,item\n", r"d.csv:3: expected a data row, found the header 'user,item' again"),
    ('user,item,text\n1,2,"two\nlines"\n3,,x\n', r"d.csv:4: column 'item': expected a non-empty id"),
    ('user,item,text\n1,2,"unclosed\n3,4,x\n', r"d.csv:2: expected well-formed CSV, found: unexpected end"),
    ('user,item\n1,2\n3,"4"x\n', r"d.csv:3: expected well-formed CSV"),
    ("\n\n", r"d.csv:1: expected a header line"),
]


@pytest.mark.parametrize("text,match", GENERIC_ERRORS)
def test_generic_errors_name_file_line_and_expectation(tmp_path, path_kind, text, match):
    with pytest.raises(DataError, match=match):
        formats.read_generic(write(tmp_path / "d.csv", text), None)


def test_generic_item_file_errors(tmp_path, path_kind):
    data = write(tmp_path / "d.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match=r"items.csv:1: missing required column 'title'"):
        formats.read_generic(data, write(tmp_path / "items.csv", "item,text\n2,x\n"))
    with pytest.raises(DataError, match=r"items.csv:3: expected 2 fields"):
        formats.read_generic(data, write(tmp_path / "items.csv", "item,title\n2,x\n3\n"))
    with pytest.raises(DataError, match=r"nope.csv: file not found"):
        formats.read_generic(data, tmp_path / "nope.csv")


HEADERLESS_ERRORS = [
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2\t3\n", r"u.data:2: expected 4 fields separated by '\\t'"),
    ("ml-100k", "u.data", "1\t2\tx\t4\n", r"u.data:1: column 'rating': expected a number, found 'x'"),
    ("ml-100k", "u.data", "", r"u.data:1: expected rows of user, item, rating, timestamp, found an empty file"),
    ("ml-100k", "u.item", f"1|Toy Story (1995)|||x|{NO_FLAGS}\n2|B|||x|{NO_FLAGS[:-1]}2\n",
     r"u.item:2: column 'Western': expected a genre flag 0 or 1, found '2'"),
    ("ml-100k", "u.item", "1|Toy Story (1995)|||x|0|1\n", r"u.item:1: expected 24 fields separated by '\|'"),
    ("ml-1m", "ratings.dat", "1::2::3::4\n\n::2::3::4\n", r"ratings.dat:3: column 'UserID': expected a non-empty id"),
    ("ml-1m", "ratings.dat", "1::2::3::-inf\n", r"ratings.dat:1: column 'Timestamp': expected a finite number"),
    ("ml-1m", "movies.dat", "1::A (1999)::Drama\n1::B::Drama\n",
     r"movies.dat:2: expected each item id once, found '1' again \(first on line 1\)"),
    ("ml-1m", "movies.dat", "1::A (1999)\n", r"movies.dat:1: expected 3 fields separated by '::'"),
]


@pytest.mark.parametrize("fmt,name,text,match", HEADERLESS_ERRORS)
def test_headerless_errors_name_file_line_and_expectation(tmp_path, fmt, name, text, match):
    d = grouplens_dir(tmp_path) if fmt == "ml-100k" else ml1m_dir(tmp_path)
    write(d / name, text)
    with pytest.raises(DataError, match=match):
        load_interactions(str(d))


def test_parquet_errors_name_file_and_row(tmp_path, path_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"user": ["a", None], "item": ["x", "y"]}), path)
    with pytest.raises(DataError, match=r"data.parquet:2: column 'user': expected a non-empty id"):
        formats.read_generic(path)
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "rating": [float("nan")]}), path)
    with pytest.raises(DataError, match=r"data.parquet:1: column 'rating': expected a finite number"):
        formats.read_generic(path)
    pq.write_table(pa.table({"user": ["a"], "rating": [1.0]}), path)
    with pytest.raises(DataError, match=r"data.parquet: missing required column 'item'.*found header user, rating"):
        formats.read_generic(path)
    path.write_text("not parquet")
    with pytest.raises(DataError, match=r"data.parquet: expected a Parquet file"):
        formats.read_generic(path)


def test_plain_files_take_the_column_wise_path(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")

    def no_rows(*args, **kwargs):
        raise AssertionError("row-by-row path used for a plain file")

    monkeypatch.setattr(formats, "_collect", no_rows)
    d = ml_latest_dir(tmp_path)
    (d / "movies.csv").unlink()
    assert len(formats.read_ml_latest(d)) == 3
    assert len(formats.read_generic(write(tmp_path / "d.tsv", "user\titem\trating\na\tx\t1\n"))) == 1


# ---------------------------------------------------------------- bad input (issue #12, finding 5)

def test_parquet_string_and_boolean_ratings_name_file_column_and_row(tmp_path, path_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "rating": ["4", "great"]}), path)
    with pytest.raises(DataError, match=r"data.parquet:2: column 'rating': expected a number, found 'great'"):
        formats.read_generic(path)
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "rating": [True, False]}), path)
    with pytest.raises(DataError, match=r"data.parquet:1: column 'rating': expected a number, found 'true'"):
        formats.read_generic(path)
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "timestamp": pa.array([b"\xff"], pa.binary())}), path)
    with pytest.raises(DataError, match=r"data.parquet: column 'timestamp': expected numbers or strings, found binary"):
        formats.read_generic(path)


def test_atomic_item_file_with_a_short_row_names_file_and_line(tmp_path):
    d = tmp_path / "atomic"
    write(d / "mine.inter", "user_id:token\titem_id:token\trating:float\n1\t10\t4\n")
    write(d / "mine.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n10\tHeat\t1995\n11\n")
    with pytest.raises(DataError, match=r"mine.item:3: expected 3 tab-separated fields .*got 1"):
        load_interactions(str(d))
    write(d / "mine.item", "item_id:token\tmovie_title:token_seq\n10\tHeat\n10\tHeat again\n")
    with pytest.raises(DataError, match=r"mine.item:3: expected each item id once, found '10' again \(first on line 2\)"):
        load_interactions(str(d))


OVERFLOWING = "1e308"  # a finite float64 that is inf as a float32 rating


@pytest.mark.parametrize("fmt", ["generic", "generic-tsv", "ml-latest", "grouplens-100k", "ml-1m", "atomic"])
def test_a_rating_that_would_become_inf_is_refused_with_file_and_line(tmp_path, path_kind, fmt):
    if fmt == "generic":
        source = write(tmp_path / "d.csv", f"user,item,rating\n1,2,5\n1,3,{OVERFLOWING}\n")
    elif fmt == "generic-tsv":
        source = write(tmp_path / "d.tsv", f"user\titem\trating\n1\t2\t5\n1\t3\t{OVERFLOWING}\n")
    elif fmt == "ml-latest":
        source = ml_latest_dir(tmp_path)
        write(source / "ratings.csv", f"{ML_HEADER}1,1,4,1\n1,2,{OVERFLOWING},2\n")
    elif fmt == "grouplens-100k":
        source = grouplens_dir(tmp_path)
        write(source / "u.data", f"1\t2\t3\t4\n1\t3\t{OVERFLOWING}\t5\n")
    elif fmt == "ml-1m":
        source = ml1m_dir(tmp_path)
        write(source / "ratings.dat", f"1::2::3::4\n1::3::{OVERFLOWING}::5\n")
    else:
        source = tmp_path / "atomic"
        write(source / "x.inter", f"user_id:token\titem_id:token\trating:float\n1\t10\t4\n1\t11\t{OVERFLOWING}\n")
    with pytest.raises(DataError, match=r":(2|3): column '(rating|Rating)': expected a rating within ±3.4e\+38"):
        load_interactions(str(source))


def test_parquet_rating_that_would_become_inf_is_refused_with_the_row(tmp_path, path_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "rating": [4.0, 1e308]}), path)
    with pytest.raises(DataError, match=r"data.parquet:2: column 'rating': expected a rating within"):
        formats.read_generic(path)


def test_a_byte_that_is_not_utf8_is_reported_on_its_own_line(tmp_path, path_kind):
    # far beyond the first line and the first 8 KiB a text reader decodes at once
    good = "".join(f"u{k},i{k},4\n" for k in range(3000))
    path = tmp_path / "d.csv"
    path.write_bytes(b"user,item,rating\n" + good.encode() + b"u\xe9,i1,4\n")
    with pytest.raises(DataError) as err:
        formats.read_generic(path)
    assert err.value.line == 3002 and "byte 0xe9" in str(err.value)
    d = grouplens_dir(tmp_path)
    (d / "u.data").write_bytes(b"1\t2\t3\t4\r\n1\t3\t4\t5\r\n1\t4\t5\t6\r\n\xff\t1\t1\t1\r\n")
    with pytest.raises(DataError, match=r"u.data:4: expected utf-8 text, found byte 0xff"):
        load_interactions(str(d))
    atomic = tmp_path / "atomic"
    (atomic).mkdir()
    (atomic / "x.inter").write_bytes(b"user_id:token\titem_id:token\n1\t2\n1\t3\r1\t\xc3(\n")
    with pytest.raises(DataError, match=r"x.inter:4: expected utf-8 text, found byte 0xc3"):
        load_interactions(str(atomic))


@pytest.mark.parametrize("fmt", ["generic", "ml-latest", "grouplens-100k", "atomic"])
def test_latin1_is_read_only_when_named_and_then_with_a_warning(tmp_path, path_kind, fmt, caplog):
    if fmt == "generic":
        source = write(tmp_path / "d.csv", "user,item,text\nbj\u00f6rk,1,caf\u00e9\n", encoding="latin-1")
    elif fmt == "ml-latest":
        source = ml_latest_dir(tmp_path)
        write(source / "movies.csv", "movieId,title,genres\n1,Caf\u00e9 (1995),Drama\n", encoding="latin-1")
    elif fmt == "grouplens-100k":
        source = grouplens_dir(tmp_path)
        write(source / "u.data", "bj\u00f6rk\t1\t3\t4\n", encoding="latin-1")
    else:
        source = tmp_path / "atomic"
        write(source / "x.inter", "user_id:token\titem_id:token\nbj\u00f6rk\t1\n", encoding="latin-1")
    with pytest.raises(DataError, match=r":2: expected utf-8 text|u.data:1: expected utf-8 text"):
        load_interactions(str(source))
    assert "not UTF-8" not in caplog.text
    data = load_interactions(str(source), encoding="latin-1")
    assert "bj\u00f6rk" in data.user_ids or "Caf\u00e9" in [i.title for i in data.items]
    assert "reading as iso8859-1, not UTF-8, as asked" in caplog.text
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        load_interactions(str(source), encoding="klingon")


def test_items_file_text_column_round_trips_and_an_empty_text_names_its_line(tmp_path):
    from common.data.items_file import read_item_texts, read_items_file, write_items_file

    path = tmp_path / "items.csv"
    write_items_file(path, ["1", "2"], ["Toy Story (1995)", "Heat (1995)"],
                     ["Toy Story (1995) | Animation, Comedy", "Heat, with a comma | Crime"])
    assert read_items_file(path) == (["1", "2"], ["Toy Story (1995)", "Heat (1995)"])
    assert read_item_texts(path) == ["Toy Story (1995) | Animation, Comedy", "Heat, with a comma | Crime"]
    write_items_file(path, ["1"], ["Toy Story (1995)"])  # an older server's file: no text column
    assert read_item_texts(path) is None
    path.write_text("item_id,title,text\n1,Toy Story,ok\n2,Heat,\n")
    with pytest.raises(DataError, match=r"items.csv:3: column 'text': expected the item's text"):
        read_item_texts(path)
    with pytest.raises(ValueError, match="2 item ids but 1 texts"):
        write_items_file(path, ["1", "2"], ["a", "b"], ["x"])
