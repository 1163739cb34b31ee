"""Packaging for serving: after a promotion, the Bento of the recommendation service is built and its tag recorded.

The Bento carries code and pinned dependencies only (bentofile.yaml); the models come from the registry at
start-up by alias, so one Bento serves whichever version is champion — the asset records which champion it was
built after, for the release log.
"""

import dagster as dg

from sessionrec.assets.resources import SessionrecResource
from sessionrec.assets.training import champion_model


@dg.asset(group_name="serving", kinds={"bentoml"}, description="The BentoML service packed by `bentoml build` "
          "after a promotion (Dagster, GX and Evidently are not in it); the tag is in the metadata.")
def recommender_bento(context: dg.AssetExecutionContext, sessionrec: SessionrecResource,
                      champion_model: dict) -> dg.Output[str | None]:
    from sessionrec.serving.packaging import build_bento

    if not champion_model["passed"]:
        context.log.info("no promotion in this run: the Bento of the current champion stays as it is")
        return dg.Output(None, metadata={"built": False, "reason": "the challenger was not promoted"})
    settings = sessionrec.settings()
    version = champion_model["champion_version"]
    tag = build_bento(settings.home / "bentoml", labels={"champion_version": str(version)})
    return dg.Output(tag, metadata={"built": True, "bento_tag": tag, "champion_version": version,
                                    "bentoml_home": dg.MetadataValue.path(str(settings.home / "bentoml")),
                                    "serve": f"BENTOML_HOME={settings.home / 'bentoml'} bentoml serve {tag}"})
