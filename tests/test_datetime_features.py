"""Timestamp feature columns (features.py's ``datetime`` kind): the cells it reads, the local
time it derives with daylight saving right, what the head sees, and what the schema saves."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest

from data_preprocessing.features import (DATETIME_PARTS, DEFAULT_DATETIME_PARTS, FeatureColumn, FeatureError,
                                         FeatureSchema, FeatureSpec, datetime_parts, parse_column_specs,
                                         parse_datetime)
from data_preprocessing.posts import PrepareConfig, parse_features

NY = "America/New_York"
UTC_2330 = datetime(2025, 3, 5, 23, 30, tzinfo=timezone.utc)
POSTED = FeatureColumn("posted_at", "datetime")  # UTC
POSTED_NY = FeatureColumn("posted_at", "datetime", timezone=NY)


@pytest.mark.parametrize("cell", [
    "2025-03-05T23:30:00+0000",  # Instagram Graph API
    "2025-03-05T23:30:00Z", "2025-03-05T23:30:00+00:00", " 2025-03-05 23:30:00 ",
    "2025-03-06T00:30:00+01:00",  # another offset, the same instant
    "1741217400", 1741217400, 1741217400.0, "1741217400000", 1741217400000,  # Unix s / ms (TikTok)
    UTC_2330,
])
def test_the_same_instant_in_every_accepted_form(cell):
    assert parse_datetime(cell) == UTC_2330
    assert parse_datetime(cell).tzinfo == timezone.utc


def test_a_cell_without_offset_is_read_in_the_zone_with_daylight_saving():
    # New York is UTC-5 in January and UTC-4 in July: the same wall clock, different instants
    assert parse_datetime("2025-01-15T12:00", NY) == datetime(2025, 1, 15, 17, tzinfo=timezone.utc)
    assert parse_datetime("2025-07-15T12:00", NY) == datetime(2025, 7, 15, 16, tzinfo=timezone.utc)
    assert parse_datetime("2025-07-15T12:00") == datetime(2025, 7, 15, 12, tzinfo=timezone.utc)  # default UTC
    # a cell with an offset ignores the zone
    assert parse_datetime("2025-07-15T12:00Z", NY) == datetime(2025, 7, 15, 12, tzinfo=timezone.utc)


def test_strptime_format_meta_business_suite():
    # Meta Business Suite exports "03/05/2025 23:30", local time
    t = parse_datetime("03/05/2025 23:30", NY, "%m/%d/%Y %H:%M")
    assert t == datetime(2025, 3, 6, 4, 30, tzinfo=timezone.utc)
    # ISO still reads with a format set (a client may send either)
    assert parse_datetime("2025-03-05T23:30:00Z", NY, "%m/%d/%Y %H:%M") == UTC_2330
    # a format with %z carries its own offset
    assert parse_datetime("05.03.2025 23:30 +0000", NY, "%d.%m.%Y %H:%M %z") == UTC_2330


def test_compact_date_is_iso_not_unix_seconds():
    # 20250305 as Unix seconds would be August 1970: outside the plausible years, so ISO basic wins
    assert parse_datetime("20250305") == datetime(2025, 3, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("cell", ["yesterday", "2025-13-01T00:00:00Z", "2025-02-30", "25:00", "17", 17, "12k",
                                  True, float("inf"), "-1741217400", 4102444800, [2025]])
def test_bad_cells_raise_invalid_datetime_naming_column_and_value(cell):
    with pytest.raises(FeatureError) as e:
        POSTED_NY.parse(cell)
    assert e.value.reason == "invalid_datetime" and e.value.column == "posted_at"
    assert e.value.message.startswith("posted_at: ") and repr(str(cell)[:50]) in e.value.message
    assert e.value.api_reason == "invalid_feature"  # what serving answers with its 422


def test_api_reason_of_other_errors_is_their_reason():
    with pytest.raises(FeatureError) as e:
        FeatureColumn("followers", "numeric", 0.0).parse("-1")
    assert e.value.api_reason == e.value.reason == "invalid_feature"


@pytest.mark.parametrize("cell", ["", "   ", None, float("nan")])
def test_empty_cell_is_missing(cell):
    assert POSTED.parse(cell) is None and parse_datetime(cell) is None


def test_parse_returns_unix_seconds_and_is_idempotent():
    v = POSTED_NY.parse("2025-03-05T23:30:00+0000")
    assert v == UTC_2330.timestamp() and isinstance(v, float)
    assert POSTED_NY.parse(v) == v  # preprocessing's parent parses once, prepare_post again


def test_local_parts_follow_daylight_saving():
    # DST starts in New York on 2025-03-09 at 02:00 local: 06:30Z is 01:30 EST, 07:30Z is 03:30 EDT
    before = datetime(2025, 3, 9, 6, 30, tzinfo=timezone.utc).timestamp()
    after = datetime(2025, 3, 9, 7, 30, tzinfo=timezone.utc).timestamp()
    for value, hour in ((before, 1.5), (after, 3.5)):
        s, c = datetime_parts(value, NY, ("hour",))
        assert (s, c) == pytest.approx((math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24)))
    # Saturday 03:00 UTC is Friday 22:00 in New York: the weekday is the local one
    sat_utc = datetime(2025, 3, 8, 3, 0, tzinfo=timezone.utc).timestamp()
    friday = 4
    assert datetime_parts(sat_utc, NY, ("weekday",)) == pytest.approx(
        [math.sin(2 * math.pi * friday / 7), math.cos(2 * math.pi * friday / 7)])
    assert datetime_parts(sat_utc, "UTC", ("weekday",)) == pytest.approx(
        [math.sin(2 * math.pi * 5 / 7), math.cos(2 * math.pi * 5 / 7)])


def test_hour_23_and_hour_0_are_neighbours():
    def enc(h):
        return np.array(datetime_parts(datetime(2025, 3, 5, h, tzinfo=timezone.utc).timestamp(), "UTC", ("hour",)))

    assert np.linalg.norm(enc(23) - enc(0)) == pytest.approx(np.linalg.norm(enc(0) - enc(1)))
    assert np.linalg.norm(enc(23) - enc(0)) < 0.3 < np.linalg.norm(enc(12) - enc(0))


def test_fit_and_encode_hour_weekday_time_and_missing():
    days = [datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp() + k * 86400 + 3600 * (k % 24) for k in range(60)]
    train = days + [None] * 20
    spec = FeatureSpec.fit(FeatureColumn("posted_at", "datetime", timezone=NY, parts=DATETIME_PARTS), train)
    assert spec.transform == "cyclic" and spec.width == 6
    assert spec.input_names() == ["posted_at__hour_sin", "posted_at__hour_cos", "posted_at__weekday_sin",
                                  "posted_at__weekday_cos", "posted_at__time", "posted_at__missing"]
    d = np.asarray(days) / 86400
    assert spec.mean == pytest.approx(d.mean()) and spec.std == pytest.approx(d.std())
    assert spec.train_missing_frac == pytest.approx(0.25)
    out = spec.encode(train)
    assert out.shape == (80, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[:60, 4], (d - d.mean()) / d.std(), atol=1e-5)  # standardised time index
    np.testing.assert_allclose(out[0, :4], datetime_parts(days[0], NY, ("hour", "weekday")), atol=1e-6)
    assert (out[:60, 5] == 0).all() and (out[60:, 5] == 1).all()
    # missing: the train mean of each cyclic input and the standardised train median of time
    np.testing.assert_allclose(out[60, :4], out[:60, :4].mean(axis=0), atol=1e-5)
    assert out[60, 4] == pytest.approx((np.median(d) - d.mean()) / d.std(), abs=1e-5)
    # a time far outside the train range is clipped, as numeric inputs are
    assert spec.encode([days[-1] + 1e4 * 86400])[0, 4] == pytest.approx(10.0)


def test_default_parts_are_hour_and_weekday():
    assert POSTED_NY.parts == DEFAULT_DATETIME_PARTS == ("hour", "weekday")
    spec = FeatureSpec.fit(POSTED_NY, [UTC_2330.timestamp(), UTC_2330.timestamp() + 5000.0, None])
    assert spec.width == 5 and spec.input_names()[-1] == "posted_at__missing"
    out = spec.encode([UTC_2330.timestamp(), None])
    np.testing.assert_allclose(out[0, :4], datetime_parts(UTC_2330.timestamp(), NY), atol=1e-6)
    assert out[1, 4] == 1.0


def test_parts_are_configurable_and_saved():
    col = FeatureColumn("posted_at", "datetime", timezone=NY, parts=("weekday",))
    spec = FeatureSpec.fit(col, [UTC_2330.timestamp(), None])
    assert spec.input_names() == ["posted_at__weekday_sin", "posted_at__weekday_cos", "posted_at__missing"]
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_schema_round_trip_saves_zone_format_and_parts():
    col = FeatureColumn("posted_at", "datetime", timezone=NY, format="%m/%d/%Y %H:%M")
    follow = FeatureColumn("followers", "numeric", 0.0)
    values = {"posted_at": [UTC_2330.timestamp() + k * 7000 for k in range(30)] + [None],
              "followers": [float(k) for k in range(31)]}
    schema = FeatureSchema.fit((follow, col), values)
    d = json.loads(json.dumps(schema.to_dict()))
    saved = d["features"][1]["column"]
    assert saved == {"name": "posted_at", "kind": "datetime", "min": None, "max": None, "timezone": NY,
                     "format": "%m/%d/%Y %H:%M", "parts": ["hour", "weekday"]}
    # a numeric column's dict is as it was before datetime columns existed
    assert d["features"][0]["column"] == {"name": "followers", "kind": "numeric", "min": 0.0, "max": None}
    assert "impute_inputs" not in d["features"][0]
    again = FeatureSchema.from_dict(d)
    assert again == schema and again.width == 2 + 5
    rows = [{"followers": 3.0, "posted_at": UTC_2330.timestamp()}, {"followers": None, "posted_at": None}]
    np.testing.assert_array_equal(again.encode(rows), schema.encode(rows))


def test_describe_tells_a_client_what_to_send():
    col = FeatureColumn("posted_at", "datetime", timezone=NY, format="%m/%d/%Y %H:%M")
    d = col.describe()
    assert (d["name"], d["kind"], d["timezone"], d["format"]) == ("posted_at", "datetime", NY, "%m/%d/%Y %H:%M")
    assert "ISO 8601" in d["accepts"] and "Unix" in d["accepts"]
    assert FeatureColumn("followers", "numeric", 0.0).describe() == {"name": "followers", "kind": "numeric",
                                                                     "min": 0.0, "max": None}


def test_column_specs_with_datetime_zone_and_format():
    cols = parse_column_specs("followers:0:", "platform", "posted_at, created", timezone=NY,
                              datetime_format="%m/%d/%Y %H:%M")
    assert [(c.name, c.kind) for c in cols] == [("followers", "numeric"), ("platform", "categorical"),
                                               ("posted_at", "datetime"), ("created", "datetime")]
    assert all(c.timezone == NY and c.format == "%m/%d/%Y %H:%M" for c in cols[2:])
    assert parse_column_specs("", "", "posted_at")[0].timezone == "UTC"  # the default zone
    assert parse_column_specs("", "", "posted_at", datetime_parts="hour, time")[0].parts == ("hour", "time")
    with pytest.raises(ValueError, match="posted_at"):
        parse_column_specs("posted_at", "", "posted_at")  # named twice
    with pytest.raises(ValueError, match="IANA"):
        parse_column_specs("", "", "posted_at", timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="strptime"):
        parse_column_specs("", "", "posted_at", datetime_format="mm/dd/yyyy")


def test_zone_and_parts_apply_to_datetime_columns_only():
    with pytest.raises(ValueError, match="datetime columns only"):
        FeatureColumn("followers", "numeric", timezone=NY)
    with pytest.raises(ValueError, match="parts"):
        FeatureColumn("posted_at", "datetime", parts=("minute",))


def test_serving_parse_path_takes_the_same_string():
    schema = PrepareConfig.for_columns(PrepareConfig().resize, 100, (POSTED_NY,)).features
    assert parse_features({"posted_at": "2025-03-05T23:30:00+0000"}, schema) == {"posted_at": UTC_2330.timestamp()}
    assert parse_features({"posted_at": ""}, schema) == {"posted_at": None}
    with pytest.raises(FeatureError) as e:
        parse_features({"posted_at": "soon"}, schema)
    assert (e.value.api_reason, e.value.column) == ("invalid_feature", "posted_at")
