//! Group requests: create, add, remove, leave, update, roles, ownership, info, members, find.

use pigeon_proto::{ReqId, ServerFrame, ThreadId, UserId};
use pigeon_store::{Actor, GroupChange, GroupChanged, Hook, NewGroup};

use crate::publish::Item;
use crate::{Caller, ChatError, ChatService, Result};

/// Most users named in one request.
const MAX_USERS_PER_REQUEST: usize = 1000;

fn actor(caller: &Caller) -> Actor {
    Actor {
        user_id: caller.user_id,
        device_id: caller.device_id,
    }
}

/// Queues the change's system message for publishing, in commit order.
fn publish_on_commit(chat: &ChatService) -> Hook<GroupChanged> {
    let queue = chat.publisher.queue();
    Box::new(move |changed: &GroupChanged| {
        if let Some(message) = &changed.message {
            let item = Item::Committed {
                message: message.clone(),
                members: changed.recipients.clone(),
                skip: None,
            };
            let _ = queue.send(item);
        }
    })
}

fn check_text(field: &str, value: Option<&str>, max_chars: usize) -> Result<()> {
    match value {
        Some(text) if text.chars().count() > max_chars => Err(ChatError::LimitExceeded(format!(
            "{field} is longer than {max_chars} characters"
        ))),
        _ => Ok(()),
    }
}

async fn resolve_users(chat: &ChatService, specs: &[String]) -> Result<Vec<UserId>> {
    if specs.len() > MAX_USERS_PER_REQUEST {
        return Err(ChatError::LimitExceeded(format!(
            "at most {MAX_USERS_PER_REQUEST} users per request"
        )));
    }
    let mut users = Vec::with_capacity(specs.len());
    for spec in specs {
        users.push(super::resolve_user(chat, spec).await?.id);
    }
    Ok(users)
}

pub(crate) struct Create {
    pub(crate) id: ReqId,
    pub(crate) title: String,
    pub(crate) members: Vec<String>,
    pub(crate) topic: Option<String>,
    pub(crate) avatar: Option<String>,
    pub(crate) share_history: bool,
}

pub(crate) async fn create(
    chat: &ChatService,
    caller: &Caller,
    request: Create,
) -> Result<ServerFrame> {
    let title = request.title.trim().to_owned();
    if title.is_empty() {
        return Err(ChatError::InvalidField("title: must not be empty".into()));
    }
    check_text("title", Some(&title), chat.config.max_title_chars)?;
    check_text(
        "topic",
        request.topic.as_deref(),
        chat.config.max_topic_chars,
    )?;
    check_text(
        "avatar",
        request.avatar.as_deref(),
        chat.config.max_topic_chars,
    )?;
    let members = resolve_users(chat, &request.members).await?;
    let group = NewGroup {
        title,
        topic: request.topic.filter(|t| !t.is_empty()),
        avatar: request.avatar.filter(|a| !a.is_empty()),
        share_history: request.share_history,
        members,
    };
    let changed = chat
        .store
        .create_group(
            actor(caller),
            group,
            chat.group_limits(),
            publish_on_commit(chat),
        )
        .await?;
    let answer = ServerFrame::Group {
        id: request.id,
        group: changed.group,
    };
    chat.publish_user_events(changed.user_events).await;
    Ok(answer)
}

/// Applies one change and answers with the group as it is now.
pub(crate) async fn change(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    mut change: GroupChange,
) -> Result<ServerFrame> {
    if let GroupChange::Update { title, .. } = &mut change {
        *title = title.take().map(|t| t.trim().to_owned());
    }
    if let GroupChange::Update {
        title,
        topic,
        avatar,
        ..
    } = &change
    {
        if title.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ChatError::InvalidField("title: must not be empty".into()));
        }
        check_text("title", title.as_deref(), chat.config.max_title_chars)?;
        check_text("topic", topic.as_deref(), chat.config.max_topic_chars)?;
        check_text("avatar", avatar.as_deref(), chat.config.max_topic_chars)?;
    }
    let changed = chat
        .store
        .change_group(
            actor(caller),
            thread_id,
            change,
            chat.group_limits(),
            publish_on_commit(chat),
        )
        .await?;
    let answer = ServerFrame::Group {
        id,
        group: changed.group,
    };
    chat.publish_user_events(changed.user_events).await;
    Ok(answer)
}

pub(crate) async fn add(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    members: &[String],
) -> Result<ServerFrame> {
    let users = resolve_users(chat, members).await?;
    change(chat, caller, id, thread_id, GroupChange::AddMembers(users)).await
}

/// A change about one user (remove, set_role, transfer_ownership), named by username or id.
pub(crate) async fn about_user(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    user: &str,
    make: impl FnOnce(UserId) -> GroupChange,
) -> Result<ServerFrame> {
    let user = super::resolve_user(chat, user).await?.id;
    change(chat, caller, id, thread_id, make(user)).await
}

pub(crate) async fn info(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
) -> Result<ServerFrame> {
    chat.store.get_membership(thread_id, caller.user_id).await?;
    Ok(ServerFrame::Group {
        id,
        group: chat.store.get_group(thread_id).await?,
    })
}

pub(crate) async fn members(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    thread_id: ThreadId,
    after: Option<UserId>,
    limit: Option<u32>,
) -> Result<ServerFrame> {
    chat.store.get_membership(thread_id, caller.user_id).await?;
    // Direct threads have no member list to page: `forbidden`, as for `group_info`.
    let group = chat.store.get_group(thread_id).await?;
    let limit = limit.unwrap_or(200).clamp(1, 1000);
    let mut members = chat.store.list_members(thread_id, after, limit + 1).await?;
    let more = members.len() > limit as usize;
    members.truncate(limit as usize);
    // Markers are shown where receipts are sent, and nowhere else.
    if group.member_count > pigeon_store::PRESENCE_GROUP_LIMIT {
        for member in &mut members {
            member.read_seq = None;
            member.delivered_seq = None;
        }
    }
    Ok(ServerFrame::Members {
        id,
        thread_id,
        members,
        more,
    })
}

pub(crate) async fn find(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    members: &[String],
) -> Result<ServerFrame> {
    let mut users = resolve_users(chat, members).await?;
    users.push(caller.user_id);
    Ok(ServerFrame::Groups {
        id,
        groups: chat.store.find_groups(users).await?,
    })
}
