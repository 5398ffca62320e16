"""All routes of the API, one module per resource."""

from fastapi import APIRouter

from service.api.routes import datasets, health, jobs, models, workers

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(datasets.router)
api_router.include_router(models.router)
api_router.include_router(workers.router)
api_router.include_router(health.router)
