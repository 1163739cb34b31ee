"""Training, evaluation, registration and promotion assets.

One computation trains every configured model on the split (so the hybrid reuses the neural model fitted in the
same run) and materializes one asset per model family, each with its own leaderboard. The evaluation asset
picks the challenger; its blocking check refuses a challenger that does not beat popularity and the kNN bar;
only then is it logged and registered in MLflow (alias `challenger`) and sent through the promotion gate
(alias `champion`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from sessionrec.assets.resources import SessionrecResource
from sessionrec.assets.sessions import session_split

#: Model families as the UI shows them (asset name -> model names in it).
FAMILIES: dict[str, tuple[str, ...]] = {
    "baseline_models": ("pop", "rpop"),
    "knn_models": ("sknn", "vsknn", "stan", "vstan"),
    "neural_models": ("gru4rec", "sasrec"),
    "hybrid_model": ("hybrid",),
}
KNN = FAMILIES["knn_models"]


@dataclass(frozen=True)
class TrainedModels:
    """What a family asset hands on: per model its results and the directory its saved weights are in."""

    results: dict[str, dict[str, Any]]
    directories: dict[str, str]
    dataset: dict[str, Any]
    split_dir: str


def leaderboard_md(results: dict[str, dict[str, Any]], metric: str = "mrr@20") -> str:
    lines = ["| model | recall@20 | mrr@20 | ndcg@20 | coverage@20 | train s | device |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in sorted(results.items(), key=lambda kv: -kv[1][metric]):
        lines.append(f"| {name} | {r['recall@20']:.4f} | {r['mrr@20']:.4f} | {r['ndcg@20']:.4f} | "
                     f"{r['coverage@20']:.4f} | {r['train_seconds']:.1f} | {r['device']} |")
    return "\n".join(lines)


@dg.multi_asset(
    outs={name: dg.AssetOut(group_name="training", kinds={"pytorch"},
                            description=f"{name.replace('_', ' ')} ({', '.join(models)}): trained on the split's "
                            "train part, evaluated on its test part with the full-catalogue next-item protocol")
          for name, models in FAMILIES.items()},
    can_subset=False,
)
def trained_models(context: dg.AssetExecutionContext, sessionrec: SessionrecResource, session_split: dict[str, str]):
    from sessionrec.ops.experiment import train_and_evaluate
    from sessionrec.ops.models.registry import save_model
    from sessionrec.ops.sessiondata import read_split_tsv

    settings = sessionrec.settings()
    cfg = settings.training
    experiment = train_and_evaluate(
        read_split_tsv(Path(session_split["train"])),
        read_split_tsv(Path(session_split["test"])),
        cfg.models,
        device=cfg.device,
        seed=cfg.seed,
        overrides=cfg.overrides,
        progress=context.log.info,
        valid_days=settings.split.valid_days,
    )
    out = settings.outputs_dir / "models" / context.run_id
    directories = {}
    for name, model in experiment.models.items():
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        save_model(model, directory)
        experiment.index.save(directory / "item_index.json")
        directories[name] = str(directory)
    (out / "results.json").write_text(json.dumps(experiment.as_json(), indent=2, default=str))
    for family, names in FAMILIES.items():
        results = {n: experiment.results[n] for n in names if n in experiment.results}
        yield dg.Output(
            TrainedModels(results, {n: directories[n] for n in results}, experiment.dataset,
                          str(Path(session_split["train"]).parent)),
            output_name=family,
            metadata={
                "models": dg.MetadataValue.json(sorted(results)),
                "leaderboard": dg.MetadataValue.md(leaderboard_md(results) if results else "(none configured)"),
                **{f"{n}_mrr@20": round(r["mrr@20"], 4) for n, r in results.items()},
                **{f"{n}_recall@20": round(r["recall@20"], 4) for n, r in results.items()},
                "dataset_fingerprint": experiment.dataset["fingerprint"],
            },
        )


@dg.asset(group_name="training", description="Leaderboard of all families on the same test split; the best model "
          "by the promotion metric is the challenger candidate.")
def model_evaluation(
    sessionrec: SessionrecResource,
    baseline_models: TrainedModels,
    knn_models: TrainedModels,
    neural_models: TrainedModels,
    hybrid_model: TrainedModels,
) -> dg.Output[dict[str, Any]]:
    metric = sessionrec.settings().promotion.metric
    families = (baseline_models, knn_models, neural_models, hybrid_model)
    results = {n: r for f in families for n, r in f.results.items()}
    directories = {n: d for f in families for n, d in f.directories.items()}
    best = max(results, key=lambda n: results[n][metric])
    summary = {"metric": metric, "challenger": best, "results": results, "directories": directories,
               "dataset": baseline_models.dataset, "split_dir": baseline_models.split_dir}
    return dg.Output(
        summary,
        metadata={
            "challenger": best,
            f"challenger_{metric}": round(results[best][metric], 4),
            "leaderboard": dg.MetadataValue.md(leaderboard_md(results, metric)),
            "n_predictions": results[best]["n_predictions"],
        },
    )


def _bar(results: dict[str, dict[str, Any]], names: tuple[str, ...], metric: str) -> tuple[str, float] | None:
    present = [n for n in names if n in results]
    if not present:
        return None
    name = max(present, key=lambda n: results[n][metric])
    return name, results[name][metric]


@dg.asset_check(asset=model_evaluation, blocking=True, description="The challenger must beat the popularity "
                "baseline and match or beat the best kNN model, otherwise nothing is registered.")
def challenger_beats_baselines(sessionrec: SessionrecResource, model_evaluation: dict[str, Any]) -> dg.AssetCheckResult:
    settings = sessionrec.settings()
    metric, results, best = model_evaluation["metric"], model_evaluation["results"], model_evaluation["challenger"]
    value = results[best][metric]
    problems, evidence = [], {"challenger": best, metric: value}
    pop = _bar(results, ("pop",), metric)
    if pop is None:
        problems.append("the popularity baseline was not trained: add 'pop' to training.models")
    elif value <= pop[1] + settings.promotion.min_lift_over_popularity:
        problems.append(f"{best} {metric} {value:.4f} does not beat popularity {pop[1]:.4f}")
    knn = _bar(results, KNN, metric)
    if knn is not None and value < knn[1]:
        problems.append(f"{best} {metric} {value:.4f} is below the kNN bar ({knn[0]} {knn[1]:.4f})")
    evidence.update({"popularity": pop, "knn_bar": knn})
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or
                               f"{best} beats popularity and the kNN bar", metadata={"evidence":
                                                                                    dg.MetadataValue.json(evidence)})


@dg.asset(group_name="registry", kinds={"mlflow"}, description="Every model's run logged to MLflow; the challenger "
          "registered as a new version with the alias `challenger`.")
def registered_model(context: dg.AssetExecutionContext, sessionrec: SessionrecResource,
                     model_evaluation: dict[str, Any]) -> dg.Output[dict[str, Any]]:
    import numpy as np

    from sessionrec.integrations.mlflow_registry import Registry
    from sessionrec.integrations.mlflow_tracking import TrackingStore
    from sessionrec.ops.evaluation import item_popularity
    from sessionrec.ops.models.base import FitReport
    from sessionrec.ops.models.registry import load_model
    from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv
    from sessionrec.serving.candidates import model_candidate_index

    settings = sessionrec.settings()
    store = TrackingStore(settings.tracking_uri, settings.artifacts_dir, settings.tracking.experiment)
    registry = Registry(settings.tracking_uri, settings.tracking.registered_model)
    best = model_evaluation["challenger"]
    names = list(model_evaluation["results"]) if settings.training.log_all_runs else [best]
    dataset = model_evaluation["dataset"]
    records = {}
    for name in sorted(names, key=lambda n: n != best):
        directory = Path(model_evaluation["directories"][name])
        index = ItemIndex.load(directory / "item_index.json")
        train, _ = SessionData.from_frame(read_split_tsv(Path(model_evaluation["split_dir"]) / "train.tsv"), index)
        result = model_evaluation["results"][name]
        report = FitReport(epochs=result["fit"]["epochs"], best_epoch=result["fit"]["best_epoch"],
                           best_valid_mrr=result["fit"]["best_valid_mrr"], train_seconds=result["train_seconds"],
                           device=result["device"], events_per_second=result["fit"]["events_per_second"])
        model, popularity = load_model(directory), item_popularity(train)
        candidates = (  # serving's FAISS index travels with the version it belongs to
            model_candidate_index(model, np.argsort(-popularity, kind="stable"), settings.serving.ann_threshold_items)
            if name == best else None
        )
        records[name] = store.log_training_run(
            model, index, report, result, {}, dataset,
            {"dagster_run_id": context.run_id, "role": "challenger" if name == best else "candidate"},
            item_popularity=popularity, candidates=candidates,
        )
        context.log.info(f"logged {name}: run {records[name].run_id}")
    version = registry.register(records[best], model_evaluation["results"][best], dataset["fingerprint"])
    return dg.Output(
        {"version": version, "model": best, "run_id": records[best].run_id, "dataset": dataset,
         "popularity": model_evaluation["results"].get("pop"), "directory": model_evaluation["directories"][best],
         "split_dir": model_evaluation["split_dir"]},
        metadata={
            "version": version,
            "model": best,
            "mlflow_run": dg.MetadataValue.url(f"{_ui_base()}/{records[best].run_url_path}"),
            "runs_logged": dg.MetadataValue.json({n: r.run_id for n, r in records.items()}),
            "tracking_uri": settings.tracking_uri,
        },
    )


def _ui_base() -> str:
    """Where `make mlflow-ui` serves (links in the Dagster UI point there)."""
    return "http://127.0.0.1:5000"


@dg.asset(group_name="registry", kinds={"mlflow"}, description="The automatic promotion gate: the challenger "
          "becomes `champion` when it is not worse than the current champion on the same split and within the "
          "latency budget; the decision and its evidence are recorded on the version.")
def champion_model(sessionrec: SessionrecResource, registered_model: dict[str, Any]) -> dg.Output[dict[str, Any]]:
    from sessionrec.integrations.mlflow_registry import Registry
    from sessionrec.integrations.pyfunc_model import SessionRecommenderPyfunc
    from sessionrec.ops.evaluation import item_popularity
    from sessionrec.ops.models.registry import load_model
    from sessionrec.ops.sessiondata import ItemIndex, SessionData, read_split_tsv

    settings = sessionrec.settings()
    registry = Registry(settings.tracking_uri, settings.tracking.registered_model)
    directory = Path(registered_model["directory"])
    index = ItemIndex.load(directory / "item_index.json")
    split_dir = Path(registered_model["split_dir"])
    train, _ = SessionData.from_frame(read_split_tsv(split_dir / "train.tsv"), index)
    test = read_split_tsv(split_dir / "test.tsv")
    sessions = [list(items) for items in test.group_by("SessionId", maintain_order=True).agg("ItemId")["ItemId"]
                .head(300).to_list()]
    recommender = SessionRecommenderPyfunc()
    recommender.bind(load_model(directory), index, item_popularity(train))
    latency = recommender.latency_p99_ms(sessions)
    fingerprint = registered_model["dataset"]["fingerprint"]
    popularity = ({**registered_model["popularity"], "dataset_fingerprint": fingerprint}
                  if registered_model["popularity"] else None)
    decision = registry.auto_promote(registered_model["version"], settings.promotion, popularity, latency)
    champion = registry.alias("champion")
    champion_version = None if champion is None else champion.version
    return dg.Output(
        {"passed": decision.passed, "reasons": decision.reasons, "champion_version": champion_version,
         "challenger_version": registered_model["version"], "latency_p99_ms": latency},
        metadata={
            "gate_passed": decision.passed,
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons) or "(none)"),
            "champion_version": champion_version if champion_version is not None else "none",
            "challenger_version": registered_model["version"],
            "challenger_latency_p99_ms": round(latency, 2),
            "evidence": dg.MetadataValue.json(json.loads(json.dumps(decision.evidence, default=str))),
        },
    )
