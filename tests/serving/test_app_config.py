"""Pure helpers of the Serve app (no Serve here): user_config validation and metric route labels."""

import pytest

from serve_apps.recommender import _route_of, configured_index


def test_user_config_takes_index_uri_only_and_names_what_is_wrong():
    assert configured_index({"index_uri": "s3://b/index/v1/"}, "Ranker") == "s3://b/index/v1"
    assert configured_index(None, "Ranker") == configured_index({}, "Ranker") == ""
    with pytest.raises(ValueError, match=r"user_config of Retriever_1: .*unknown keys \['index_url'\]"):
        configured_index({"index_url": "s3://b/index/v1"}, "Retriever_1")
    with pytest.raises(ValueError, match=r"unknown keys \['candidates'\]"):
        configured_index({"index_uri": "s3://b/index/v1", "candidates": 100}, "Ingress")
    with pytest.raises(ValueError, match=r"index_uri=\['s3://b'\]"):
        configured_index({"index_uri": ["s3://b"]}, "Ingress")


@pytest.mark.parametrize("path, route", [
    ("/v1/recommend", "recommend"), ("/v1/search/", "search"), ("/shop/v1/search", "search"),
    ("/v1/items/sku/12/similar", "similar"), ("/v1/version", "version"), ("/healthz", "healthz"),
    ("/zz-4f1c2a", "other"), ("/", "other"), ("/v1/recommend/extra", "other"), ("/similar", "other"),
])
def test_metric_routes_are_the_apps_own_or_other(path, route):
    assert _route_of(path) == route


def test_max_k_below_the_default_k_is_refused_naming_the_key():
    """With max_k 5, every request that left k out (the routes default to 10) was refused: "k=10 is above max_k"."""
    from pydantic import ValidationError

    from serve_apps.recommender import RecommenderArgs

    assert RecommenderArgs.model_validate({"max_k": 10}).max_k == 10
    with pytest.raises(ValidationError, match=r"max_k\s+Input should be greater than or equal to 10"):
        RecommenderArgs.model_validate({"max_k": 5})
