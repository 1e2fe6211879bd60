"""A FastAPI service of the kind whose boot users wait on: pydantic models,
several routers, and a pandas/numpy catalogue built and indexed at start-up.

    python app.py --port 8080

GET /health answers 200 once the catalogue is ready; /items/{id},
/stats/{category} and /search?q= query it. Everything is computed from a
fixed seed, so every boot builds the same data. The catalogue is built at
import time, before uvicorn creates its listening socket: a restored image
starts with it in memory.
"""

import argparse
import sys
import time

T0 = time.monotonic()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fastapi import APIRouter, FastAPI, HTTPException, Query  # noqa: E402
from fastapi.responses import PlainTextResponse  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
import uvicorn  # noqa: E402

N_ITEMS = 200_000
CATEGORIES = [f"cat-{i:02d}" for i in range(40)]


class Item(BaseModel):
    id: int
    name: str
    category: str
    price: float = Field(ge=0)
    rating: float = Field(ge=0, le=5)
    stock: int


class CategoryStats(BaseModel):
    category: str
    items: int
    mean_price: float
    p95_price: float
    mean_rating: float
    in_stock: int


def build_catalogue() -> pd.DataFrame:
    rng = np.random.default_rng(20260301)
    df = pd.DataFrame(
        {
            "id": np.arange(N_ITEMS, dtype=np.int64),
            "category": pd.Categorical(rng.choice(CATEGORIES, N_ITEMS)),
            "price": np.round(rng.lognormal(3.0, 0.8, N_ITEMS), 2),
            "rating": np.round(rng.uniform(0, 5, N_ITEMS), 1),
            "stock": rng.integers(0, 500, N_ITEMS),
        }
    )
    df["name"] = "item-" + df["id"].astype(str)
    return df.set_index("id", drop=False)


def summarise(df: pd.DataFrame) -> dict:
    g = df.groupby("category", observed=True)
    out = {}
    for cat, part in g:
        out[cat] = CategoryStats(
            category=cat,
            items=len(part),
            mean_price=float(part["price"].mean()),
            p95_price=float(part["price"].quantile(0.95)),
            mean_rating=float(part["rating"].mean()),
            in_stock=int((part["stock"] > 0).sum()),
        )
    return out


CATALOGUE = build_catalogue()
STATS = summarise(CATALOGUE)
NAME_INDEX = pd.Index(CATALOGUE["name"])

items = APIRouter(prefix="/items")
stats = APIRouter(prefix="/stats")
search = APIRouter()


@items.get("/{item_id}", response_model=Item)
def get_item(item_id: int) -> Item:
    if item_id not in CATALOGUE.index:
        raise HTTPException(status_code=404, detail="no such item")
    row = CATALOGUE.loc[item_id]
    return Item(
        id=int(row["id"]),
        name=row["name"],
        category=str(row["category"]),
        price=float(row["price"]),
        rating=float(row["rating"]),
        stock=int(row["stock"]),
    )


@stats.get("/{category}", response_model=CategoryStats)
def get_stats(category: str) -> CategoryStats:
    if category not in STATS:
        raise HTTPException(status_code=404, detail="no such category")
    return STATS[category]


@search.get("/search")
def do_search(q: str = Query(min_length=1), limit: int = 10) -> list[str]:
    hits = NAME_INDEX[NAME_INDEX.str.startswith(q)]
    return list(hits[:limit])


app = FastAPI(title="catalogue")
app.include_router(items)
app.include_router(stats)
app.include_router(search)


@app.get("/health", response_class=PlainTextResponse)
def health() -> str:
    return f"payload=fastapi items={len(CATALOGUE)} categories={len(STATS)}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    print(f"fastapi: catalogue ready in {time.monotonic() - T0:.2f}s", file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
