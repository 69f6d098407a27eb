"""The HTTP contract is exact: Schemathesis, every check on, against a real uvicorn on a
loopback port serving the test model.

The document under test is the app's own ``openapi()``; the checks are all of
Schemathesis's defaults (not_a_server_error, status_code_conformance,
content_type_conformance, response_headers_conformance, response_schema_conformance,
positive_data_acceptance, negative_data_rejection, missing_required_header,
unsupported_method, ...), over the examples, coverage and fuzzing phases, in positive and
negative mode. What the test adds, each for a reason given where it is done:

- a valid ``image`` is an image: the ``binary`` and ``byte`` formats draw real images;
- 413 counts as a rejection (the API answers too many posts with 413, as documented);
- /predict/batch refusing unpaired fields, and a negative multipart case that is valid as
  sent being accepted, are not failures (``filter_failure`` says why).

The three disagreements the first Schemathesis run found are kept as regression tests.
"""

from __future__ import annotations

import base64
import io
from email.parser import BytesParser
from email.policy import HTTP

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData

from serving.app import create_app
from serving.schemas import EXAMPLE_CAPTION, EXAMPLE_IMAGE_BASE64
from serving.settings import ServingSettings
from tests.serving_fixtures import loopback

LIMITS = dict(max_caption_chars=40, max_posts_per_request=3)  # small limits: the boundaries get reached
MAX_EXAMPLES = 60  # per operation, fuzzing phase; the module takes ~45 s on 2 cores, model build included
# Per operation. A run sends about 420 requests: ~10 to each GET, 75-110 to each POST.
MIN_CASES = {"GET": 5, "POST": 50}

# The document comes from an app built with the same limits as the one served below.
DOC = create_app(ServingSettings(**LIMITS)).openapi()


def _image(width: int, height: int, color: tuple, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


# JSON Schema can say "a file" (format binary) or "base64" (format byte), not "an image",
# so by default Schemathesis sends random bytes as valid data, and the server's 415 would
# read as a rejected valid request. A valid image field is an image in an allowed format.
IMAGES = st.builds(_image, st.integers(1, 48), st.integers(1, 48), st.tuples(*[st.integers(0, 255)] * 3),
                   st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP"]))
schemathesis.openapi.format("binary", IMAGES)
schemathesis.openapi.format("byte", IMAGES.map(lambda b: base64.b64encode(b).decode()))

# More posts than MAX_POSTS_PER_REQUEST is refused with 413 (the README's error table);
# Schemathesis's default rejection statuses (the first twelve) do not list 413.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx", "413"]
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}})
schema = schemathesis.openapi.from_dict(DOC, config=CONFIG)


def _form_as_sent(request) -> dict[str, list[str]]:
    """The multipart fields of a sent request, name -> values; a file part reads as ""."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode() + request.body)
    fields: dict[str, list[str]] = {}
    for part in message.iter_parts():
        text = "" if part.get_filename() is not None else (part.get_payload(decode=True) or b"").decode(errors="replace")
        fields.setdefault(part.get_param("name", header="content-disposition"), []).append(text)
    return fields


def _valid_as_sent(case, request) -> bool:
    """Whether a multipart request, read the way a server reads it, satisfies the document."""
    ref = DOC["paths"][case.operation.path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body_schema = DOC["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    arrays = {name for name, prop in body_schema["properties"].items() if prop.get("type") == "array"}
    instance = {name: values if name in arrays or len(values) > 1 else values[0]
                for name, values in _form_as_sent(request).items()}
    return jsonschema_rs.validator_for(body_schema).is_valid(instance)


@schema.hook
def filter_failure(context, failure, case, response):
    """Two failures that are Schemathesis's, not the server's.

    1. /predict/batch pairs its repeated fields by order, a rule JSON Schema cannot state
       (the document says it in words). A generated body with unequal counts of ``image``
       and ``text`` is refused with 422 unpaired_fields, as documented; that is not a
       valid request rejected. Paired bodies (most of them) keep every check.
    2. Schemathesis judges whether a negative multipart body is "valid after
       serialization" from the values it generated, and it cannot here: it reads every
       field as one value (an array field sent as one part looks invalid) and cannot
       validate file parts (``Unsupported type: 'Binary'``). A case it mutated, say
       ``text`` to ``{}``, goes out as the text part ``{}``, a valid caption the server
       rightly accepts. Such a failure stands only if the bytes sent break the document.
    """
    if isinstance(failure, RejectedPositiveData) and response.status_code == 422:
        return response.json().get("reason") != "unpaired_fields"
    if isinstance(failure, AcceptedNegativeData) and (case.media_type or "").startswith("multipart/"):
        return not _valid_as_sent(case, response.request)
    return True


@pytest.fixture(scope="module")
def base_url(model_dir):
    with loopback(create_app(ServingSettings(model_dir=model_dir, **LIMITS))) as base:
        yield base


@pytest.fixture
def sent():
    """The requests one operation's test sent: too few, and it tested too little. (The
    GET probes take no input, so a handful of coverage cases is all there is to send.)"""
    cases: list = []
    yield cases
    method = cases[0].operation.method.upper() if cases else "POST"
    assert len(cases) >= MIN_CASES[method], f"only {len(cases)} generated requests"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, base_url, sent):
    sent.append(case)
    case.call_and_validate(base_url=base_url)


def test_served_document_is_the_one_tested(base_url):
    assert httpx.get(f"{base_url}/openapi.json").json() == DOC


# --- what the first Schemathesis run found ------------------------------------------------


def test_documented_json_example_is_accepted(base_url):
    # It was "/9j/4AAQSkZJRgABAQ...", itself refused with 422 invalid_base64.
    example = DOC["components"]["schemas"]["PostJSON"]["examples"][0]
    assert example == {"image_base64": EXAMPLE_IMAGE_BASE64, "text": EXAMPLE_CAPTION}
    r = httpx.post(f"{base_url}/predict/json", json=example)
    assert r.status_code == 200, r.text
    assert r.json()["cleaned_text"] == "Sunset at the beach! travel"
    batch = DOC["components"]["schemas"]["BatchJSON"]["examples"][0]
    r = httpx.post(f"{base_url}/predict/batch/json", json=batch)
    assert [x["status"] for x in r.json()["results"]] == [200, 200], r.text


def test_schema_violating_batch_post_fails_the_request(base_url):
    # {"posts": [[null, null]]} broke the schema yet got 200 with a per-post error.
    r = httpx.post(f"{base_url}/predict/batch/json", json={"posts": [[None, None]]})
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "validation_error"
    assert r.json()["detail"][0]["loc"] == ["body", "posts", 0]


def test_empty_multipart_batch_breaks_the_schema_and_is_refused(base_url):
    # An empty multipart batch was valid by the schema, yet got 422 no_posts.
    assert {"image", "text"} <= set(DOC["components"]["schemas"]["BatchForm"]["required"])
    r = httpx.post(f"{base_url}/predict/batch", content=b"--xyz--\r\n",
                   headers={"Content-Type": "multipart/form-data; boundary=xyz", "X-Request-ID": "empty-batch-1"})
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "missing_field"
    assert r.json()["request_id"] == r.headers["x-request-id"] == "empty-batch-1"
