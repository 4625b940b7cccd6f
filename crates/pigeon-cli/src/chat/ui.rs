//! Drawing the chat screen: conversations on the left, the selected one on the right, the
//! input line below, a banner while reconnecting, and the help overlay.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line as TextLine, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};

use super::app::App;

pub(crate) fn draw(frame: &mut Frame<'_>, app: &App) {
    let [banner_area, body, status_area, input_area] = Layout::vertical([
        Constraint::Length(u16::from(app.banner.is_some())),
        Constraint::Min(3),
        Constraint::Length(u16::from(app.status.is_some())),
        Constraint::Length(3),
    ])
    .areas(frame.area());
    if let Some(banner) = &app.banner {
        frame.render_widget(
            Paragraph::new(banner.as_str()).style(Style::new().bg(Color::Yellow).fg(Color::Black)),
            banner_area,
        );
    }
    // Narrow screens (phones, split panes) show the conversation only.
    let narrow = body.width < 60;
    let [list_area, messages_area] = if narrow {
        [Rect::default(), body]
    } else {
        Layout::horizontal([Constraint::Percentage(30), Constraint::Percentage(70)]).areas(body)
    };
    if !narrow {
        draw_list(frame, app, list_area);
    }
    draw_messages(frame, app, messages_area);
    if let Some(status) = &app.status {
        frame.render_widget(Paragraph::new(status.as_str()).fg(Color::Red), status_area);
    }
    let input = Paragraph::new(app.input.value()).block(
        Block::default()
            .borders(Borders::ALL)
            .title(" message · Enter send · F1 help "),
    );
    frame.render_widget(input, input_area);
    let cursor_x = input_area.x + 1 + u16::try_from(app.input.visual_cursor()).unwrap_or(0);
    frame.set_cursor_position((
        cursor_x.min(input_area.right().saturating_sub(2)),
        input_area.y + 1,
    ));
    if app.help {
        draw_help(frame);
    }
}

fn draw_list(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let items: Vec<ListItem<'_>> = app
        .conversations
        .iter()
        .map(|conversation| {
            let dot = match conversation.online {
                Some(true) => Span::raw("● ").fg(Color::Green),
                Some(false) => Span::raw("○ ").fg(Color::DarkGray),
                None => Span::raw("  "),
            };
            let mut spans = vec![dot, Span::raw(conversation.title.clone())];
            if conversation.unread > 0 {
                spans.push(
                    Span::raw(format!(" ({})", conversation.unread)).add_modifier(Modifier::BOLD),
                );
            }
            if conversation.muted {
                spans.push(Span::raw(" muted").fg(Color::DarkGray));
            }
            ListItem::new(TextLine::from(spans))
        })
        .collect();
    let title = format!(" conversations · {} unread ", app.total_unread());
    let list = List::new(items)
        .block(Block::default().borders(Borders::ALL).title(title))
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state =
        ListState::default().with_selected((!app.conversations.is_empty()).then_some(app.selected));
    frame.render_stateful_widget(list, area, &mut state);
}

fn draw_messages(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let Some(conversation) = app.current() else {
        let hint =
            Paragraph::new("No conversations yet. Type /to <username> <message> and press Enter.")
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL));
        frame.render_widget(hint, area);
        return;
    };
    let mut lines: Vec<TextLine<'_>> = conversation
        .lines
        .iter()
        .map(|line| {
            let name = app.name_of(line.sender);
            let mut spans = vec![
                Span::raw(format!("{name}: ")).add_modifier(Modifier::BOLD),
                Span::raw(line.text.clone()),
            ];
            if line.sender == app.me {
                let state = App::state_of(conversation, line);
                spans.push(Span::raw(format!("  [{}]", state.label())).fg(Color::DarkGray));
            }
            TextLine::from(spans)
        })
        .collect();
    let typing = app.typing_names();
    if !typing.is_empty() {
        lines.push(TextLine::from(format!("{} typing…", typing.join(", "))).fg(Color::DarkGray));
    }
    // Stick to the bottom unless scrolled up, counting the rows wrapped lines take.
    let height = usize::from(area.height.saturating_sub(2));
    let width = usize::from(area.width.saturating_sub(2)).max(1);
    let rows: usize = lines
        .iter()
        .map(|line| line.width().max(1).div_ceil(width))
        .sum();
    let bottom = rows.saturating_sub(height);
    let top = bottom.saturating_sub(app.scroll);
    let paragraph = Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .scroll((u16::try_from(top).unwrap_or(u16::MAX), 0))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" {} ", conversation.title)),
        );
    frame.render_widget(paragraph, area);
}

fn draw_help(frame: &mut Frame<'_>) {
    let area = frame.area();
    let width = area.width.min(60);
    let height = area.height.min(12);
    let popup = Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    );
    let text = vec![
        TextLine::from("Enter          send the message"),
        TextLine::from("Up/Down        choose a conversation (Ctrl-P/N)"),
        TextLine::from("PgUp/PgDn      scroll the conversation"),
        TextLine::from("/to bob hi     start a conversation with bob"),
        TextLine::from("F1 or ?        this help;  Esc  close it"),
        TextLine::from("Ctrl-C         quit"),
        TextLine::from(""),
        TextLine::from("States: pending → sent → delivered → read"),
    ];
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(" help ")),
        popup,
    );
}
