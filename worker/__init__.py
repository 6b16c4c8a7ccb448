"""Celery worker: the app (celery_app), the job task (tasks), dispatch and the reaper."""
