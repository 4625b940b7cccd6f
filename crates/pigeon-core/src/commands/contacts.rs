//! The contact book: friend requests, removal, blocks, aliases, the list, user search.

use pigeon_proto::{ContactAction, ContactState, ReqId, ServerFrame};

use crate::{Caller, ChatError, ChatService, Result};

/// Longest alias, in characters.
const MAX_ALIAS_CHARS: usize = 64;
/// Most search results.
const MAX_SEARCH_RESULTS: u32 = 20;

pub(crate) async fn act(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    user: &str,
    action: ContactAction,
) -> Result<ServerFrame> {
    let peer = super::resolve_user(chat, user).await?;
    let changed = chat
        .store
        .contact_action(caller.user_id, peer.id, action)
        .await?;
    chat.publish_user_events(changed.user_events).await;
    Ok(ServerFrame::Contact {
        id,
        contact: changed.contact,
    })
}

pub(crate) async fn alias(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    user: &str,
    alias: Option<String>,
) -> Result<ServerFrame> {
    if alias
        .as_deref()
        .is_some_and(|a| a.chars().count() > MAX_ALIAS_CHARS)
    {
        return Err(ChatError::LimitExceeded(format!(
            "alias is longer than {MAX_ALIAS_CHARS} characters"
        )));
    }
    let peer = super::resolve_user(chat, user).await?;
    let changed = chat.store.set_alias(caller.user_id, peer.id, alias).await?;
    chat.publish_user_events(changed.user_events).await;
    Ok(ServerFrame::Contact {
        id,
        contact: changed.contact,
    })
}

pub(crate) async fn list(chat: &ChatService, caller: &Caller, id: ReqId) -> Result<ServerFrame> {
    let mut contacts = chat.store.list_contacts(caller.user_id).await?;
    let friends: Vec<_> = contacts
        .iter()
        .filter(|contact| contact.state == Some(ContactState::Friend))
        .map(|contact| contact.user_id)
        .collect();
    let online_friends = chat.online_among(&friends).await?;
    for contact in &mut contacts {
        // Presence goes to friends only.
        if contact.state == Some(ContactState::Friend) {
            let online = online_friends.contains(&contact.user_id);
            contact.online = Some(online);
            if online {
                // As in presence frames: last-seen only while offline.
                contact.last_seen = None;
            }
        }
    }
    Ok(ServerFrame::Contacts { id, contacts })
}

pub(crate) async fn search(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    prefix: &str,
    limit: Option<u32>,
) -> Result<ServerFrame> {
    if chat.search_limit.check_key(&caller.user_id).is_err() {
        return Err(ChatError::RateLimited);
    }
    let prefix = prefix.trim().to_lowercase();
    let valid = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if !valid {
        return Err(ChatError::InvalidField(
            "prefix: 1 to 32 characters of a-z, 0-9, '_', '.', '-'".into(),
        ));
    }
    let limit = limit
        .unwrap_or(MAX_SEARCH_RESULTS)
        .clamp(1, MAX_SEARCH_RESULTS);
    let users = chat
        .store
        .search_users(caller.user_id, &prefix, limit)
        .await?;
    Ok(ServerFrame::Users { id, users })
}
