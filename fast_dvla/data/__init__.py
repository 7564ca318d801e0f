from .episodes import (EpisodeError, list_episodes, read_dataset_info, read_episode, write_dataset_info,
                       write_episode)

__all__ = ["EpisodeError", "list_episodes", "read_dataset_info", "read_episode", "write_dataset_info",
           "write_episode"]
